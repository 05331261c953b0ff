package execute

// Become: running the script as another user (root) through sudo, while the runner, its cache
// and the run's work dir stay the login user's. Two halves, one in each process:
//
//   - the login side (this runner, in RunPayload): the Supervisor starts
//     `sudo -S -p <BecomePrompt> -u USER -- <runner> become-exec` instead of the interpreter,
//     answers sudo's password prompt on sudo's stdin (once: a second prompt means the password
//     was refused), and waits for BecomeReady on sudo's stderr; it then writes the run's spec
//     (the interpreter's argv, work dir, environment, grace period: a JSON line, never a command
//     line) to the same stdin and closes it. Whatever sudo said before that is its reason when
//     it ends instead: the run's runner_error "become".
//   - the target side (`become-exec`, run by sudo as USER): reads the spec, runs the script
//     under a Supervisor of its own (subreaper, run mark, SIGTERM then SIGKILL to the whole
//     tree on SIGTERM/SIGINT/SIGHUP, which sudo relays from the login side), then gives the work
//     dir and the helper dir back to the login user (SUDO_UID/SUDO_GID: every entry the script
//     or its helpers created as root), and ends as the script ended (its exit code, or killed by
//     the same signal, which sudo passes on).
//
// The password travels on sudo's stdin only: never in argv, the environment, a file or a
// message (a refusal's text is sudo's own, and the password is masked out of it regardless).

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"cronium/runner/internal/exitcode"
	"cronium/runner/internal/pyjson"
)

const (
	// BecomeCommand is the runner's command that sudo starts as the target user.
	BecomeCommand = "become-exec"
	// BecomePrompt is the password prompt sudo is given (-p): no % (sudo expands those).
	BecomePrompt = "[cronium-sudo-password]"
	// BecomeReady is what become-exec writes on stderr once it runs as the target user.
	BecomeReady = "[cronium-become-ready]\n"
	// becomeMargin: the login side waits this much past the grace period before it kills sudo
	// itself (the target side stops the script's tree within the grace period, as root).
	becomeMargin      = 3 * time.Second
	maxSudoChatter    = 64 * 1024        // what sudo may say before the ready line (its reason)
	maxBecomeSpec     = 64 * 1024 * 1024 // the spec: argv, env, paths
	pdeathsig         = 1                // PR_SET_PDEATHSIG
	maxGiveBackDepth  = 512
	oPath             = 0x200000 // O_PATH, the same on every Linux architecture we build for
	atSymlinkNofollow = 0x100
)

// Become is a run's sudo settings (run context "become") and, after the run, why sudo refused.
type Become struct {
	User        string
	Password    string
	HasPassword bool

	spec    []byte // the JSON line for become-exec
	Failure string // sudo ended without starting become-exec: why (its own words)
}

// becomeSpec is what become-exec needs to run the script: JSON on its stdin.
type becomeSpec struct {
	Argv      []string `json:"argv"`
	Dir       string   `json:"dir"`
	HelperDir string   `json:"helper_dir"`
	Env       []string `json:"env"`
	GraceS    float64  `json:"grace_s"`
}

// BecomeFrom reads the run context's "become": {"user": NAME, "password": str|null}.
func BecomeFrom(v any) (*Become, error) {
	obj, ok := v.(*pyjson.Object)
	if !ok {
		return nil, exitcode.New(exitcode.Usage, "run context 'become' must be a mapping")
	}
	name, _ := obj.Get("user")
	userName, ok := name.(string)
	if !ok || !validUserName(userName) {
		return nil, exitcode.New(exitcode.Usage, "run context 'become' needs a valid user name")
	}
	b := &Become{User: userName}
	if password, _ := obj.Get("password"); password != nil {
		text, ok := password.(string)
		if !ok || strings.ContainsAny(text, "\n\r\x00") {
			return nil, exitcode.New(exitcode.Usage, "run context 'become' password must be one line of text")
		}
		b.Password, b.HasPassword = text, true
	}
	return b, nil
}

// validUserName: what sudo -u may be given and cannot take for an option or a #uid.
func validUserName(name string) bool {
	if name == "" || len(name) > 64 || name[0] == '-' || name[0] == '#' {
		return false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("._-$@", c)) {
			return false
		}
	}
	return true
}

// prepare turns the interpreter's command line into sudo's, and keeps the spec for the
// handshake: sudo's argv and environment. executable is this runner (become-exec is its
// command).
func (b *Become) prepare(argv []string, dir, helperDir string, env []string, grace time.Duration, executable string) ([]string, []string, error) {
	sudo, err := exec.LookPath("sudo")
	if err != nil {
		return nil, nil, exitcode.New(exitcode.BecomeFailed, "become: sudo is not installed on this server (not found on PATH)")
	}
	spec, err := json.Marshal(becomeSpec{Argv: argv, Dir: dir, HelperDir: helperDir, Env: env, GraceS: grace.Seconds()})
	if err != nil {
		return nil, nil, err
	}
	b.spec = append(spec, '\n')
	return []string{sudo, "-S", "-p", BecomePrompt, "-u", b.User, "--", executable, BecomeCommand}, sudoEnv(env), nil
}

// sudoEnv is sudo's own environment: the locale (for its messages) and a system PATH, and
// nothing else of the run's, which goes in the spec instead. sudo would hold the event's
// secrets in its environment otherwise, and it may log that environment (its JSON event log
// and sudo_logsrvd record the submitting user's environment).
func sudoEnv(env []string) []string {
	out := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if name == "LANG" || name == "LANGUAGE" || strings.HasPrefix(name, "LC_") {
			out = append(out, kv)
		}
	}
	return out
}

// handshake reads sudo's stderr until become-exec says it is ready: it answers the password
// prompt, then hands over the spec and closes stdin. It returns what followed the ready line
// (the script's first stderr bytes) and true; or false when sudo ended first (b.Failure set).
func (b *Become) handshake(stderr io.Reader, stdin io.WriteCloser) ([]byte, bool) {
	defer stdin.Close()
	var said []byte // sudo's words, prompts taken out
	pending := []byte{}
	prompts := 0
	buf := make([]byte, 4096)
	for {
		for {
			if i := bytes.Index(pending, []byte(BecomePrompt)); i >= 0 {
				said = append(said, pending[:i]...)
				pending = pending[i+len(BecomePrompt):]
				prompts++
				if prompts == 1 && b.HasPassword {
					stdin.Write([]byte(b.Password + "\n"))
				} else {
					stdin.Close() // no (other) password to give: sudo reads the end and says so
				}
				continue
			}
			if i := bytes.Index(pending, []byte(BecomeReady)); i >= 0 {
				if _, err := stdin.Write(b.spec); err != nil {
					b.Failure = "become: the runner as " + b.User + " did not take its work: " + err.Error()
					return nil, false
				}
				return pending[i+len(BecomeReady):], true
			}
			break
		}
		// Keep what could be the start of a marker; the rest is sudo's.
		keep := max(len(BecomePrompt), len(BecomeReady))
		if len(pending) > keep {
			said = append(said, pending[:len(pending)-keep]...)
			pending = pending[len(pending)-keep:]
		}
		if len(said) > maxSudoChatter {
			said = said[len(said)-maxSudoChatter:]
		}
		n, err := stderr.Read(buf)
		pending = append(pending, buf[:n]...)
		if err != nil && n == 0 {
			said = append(said, pending...)
			b.Failure = b.failure(string(said), prompts)
			return nil, false
		}
	}
}

// failure is the run's error when sudo ended without starting the command.
func (b *Become) failure(said string, prompts int) string {
	var lines []string
	for _, line := range strings.Split(said, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			lines = append(lines, line)
		}
	}
	text := strings.Join(lines, " ")
	if b.HasPassword && b.Password != "" {
		text = strings.ReplaceAll(text, b.Password, "***")
	}
	if len(text) > 1000 {
		text = text[len(text)-1000:]
	}
	if text == "" {
		text = "it said nothing"
	}
	switch {
	case prompts > 0 && !b.HasPassword:
		return fmt.Sprintf("become: sudo needs a password to run as %s and none was given (sudo: %s)", b.User, text)
	case prompts > 1:
		return fmt.Sprintf("become: sudo did not accept the password to run as %s (sudo: %s)", b.User, text)
	}
	return fmt.Sprintf("become: sudo refused to run as %s: %s", b.User, text)
}

// BecomeExec is `cronium-runner become-exec`, started by sudo as the target user: see the top
// of this file. Its exit is the script's.
func BecomeExec() int {
	// Should sudo die (killed by the login side), stop as if told to.
	syscall.RawSyscall6(syscall.SYS_PRCTL, pdeathsig, uintptr(syscall.SIGTERM), 0, 0, 0, 0)
	if os.Getppid() == 1 {
		return int(exitcode.BecomeFailed)
	}
	if _, err := os.Stderr.WriteString(BecomeReady); err != nil {
		return int(exitcode.BecomeFailed)
	}
	data, err := io.ReadAll(io.LimitReader(os.Stdin, maxBecomeSpec))
	var spec becomeSpec
	if err == nil {
		err = json.Unmarshal(data, &spec)
	}
	if err == nil && (len(spec.Argv) == 0 || spec.Dir == "") {
		err = fmt.Errorf("no command or work dir")
	}
	if err != nil {
		// Not the parser's words: they quote what was read, which should sudo have left the
		// password on stdin would be part of it.
		fmt.Fprintf(os.Stderr, "cronium-runner %s: no valid spec on stdin\n", BecomeCommand)
		return int(exitcode.Usage)
	}
	owner, ownerOK := sudoOwner()
	if os.Geteuid() == 0 && !ownerOK {
		fmt.Fprintf(os.Stderr, "cronium-runner %s: SUDO_UID/SUDO_GID not set: run by sudo only\n", BecomeCommand)
		return int(exitcode.Usage)
	}
	if ownerOK {
		// Only a work dir of the user who ran sudo is worked in and given back.
		for _, dir := range []string{spec.Dir, spec.HelperDir} {
			if dir == "" {
				continue
			}
			if err := ownedDir(dir, owner.uid); err != nil {
				fmt.Fprintf(os.Stderr, "cronium-runner %s: %v\n", BecomeCommand, err)
				return int(exitcode.Workdir)
			}
		}
	}
	supervisor := &Supervisor{Argv: spec.Argv, Dir: spec.Dir, Env: targetEnv(spec.Env, spec.HelperDir),
		Timeout: Seconds(1e12), Grace: Seconds(spec.GraceS), Reporter: passThrough{}}
	// Once the script's tree is gone, giving the work dir back is bounded work that must not be
	// cut short (root's files would stay in the login user's cache): a late stop (sudo relaying
	// the login side's SIGTERM, or this process's parent-death signal once sudo is SIGKILLed)
	// is taken here, and dropped, until it is done. During the run the Supervisor acts on it.
	held := make(chan os.Signal, 1)
	signal.Notify(held, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	outcome, runErr := supervisor.Run()
	if ownerOK && os.Geteuid() == 0 {
		for _, dir := range []string{spec.Dir, spec.HelperDir} {
			if dir != "" {
				if err := unmountUnder(dir); err != nil {
					fmt.Fprintf(os.Stderr, "cronium-runner %s: a mount left in %s: %v\n", BecomeCommand, dir, err)
				}
				if err := giveBack(dir, owner); err != nil {
					fmt.Fprintf(os.Stderr, "cronium-runner %s: cannot give %s back: %v\n", BecomeCommand, dir, err)
				}
			}
		}
	}
	signal.Stop(held)
	if runErr != nil {
		fmt.Fprintf(os.Stderr, "cronium-runner %s: %v\n", BecomeCommand, runErr)
		return int(AsRunnerError(runErr).Code)
	}
	if outcome.Signal != 0 { // end as the script did: sudo passes the signal on
		sig := syscall.Signal(outcome.Signal)
		signal.Reset(sig)
		syscall.Kill(os.Getpid(), sig)
		time.Sleep(time.Second)
	}
	return outcome.ExitCode
}

type ids struct{ uid, gid int }

// sudoOwner is the user who ran sudo (sudo sets SUDO_UID and SUDO_GID; the caller cannot).
func sudoOwner() (ids, bool) {
	uid, errU := strconv.Atoi(os.Getenv("SUDO_UID"))
	gid, errG := strconv.Atoi(os.Getenv("SUDO_GID"))
	return ids{uid, gid}, errU == nil && errG == nil
}

// ownedDir checks that path is a directory (not through a symlink at its end) owned by uid.
func ownedDir(path string, uid int) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		return fmt.Errorf("work dir %s: %v", path, err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFDIR || int(st.Uid) != uid {
		return fmt.Errorf("work dir %s is not a directory of the user who ran sudo", path)
	}
	return nil
}

// giveBack makes every entry under dir (dir included) owned by owner again, through
// directory file descriptors: nothing is followed, so a symlink (or a directory swapped for
// one meanwhile) cannot send a chown outside the tree; no file keeps a setuid or setgid bit or
// a file capability (chown clears them). Two kinds of entry are left as they
// are, because they are not the tree's own: anything on another filesystem (a mount the
// script left in the work dir, a bind mount of / included) and a file with more than one hard
// link (`ln /etc/passwd .` or `cp -al` as root: the link is the system file itself). The
// login user can still remove them from the work dir (unlinking needs only the directory).
func giveBack(dir string, owner ids) error {
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil || int(st.Uid) != owner.uid {
		syscall.Close(fd)
		return fmt.Errorf("no longer a directory of uid %d", owner.uid)
	}
	return giveBackAt(fd, owner, uint64(st.Dev), 0)
}

func giveBackAt(dirfd int, owner ids, device uint64, depth int) error {
	dir := os.NewFile(uintptr(dirfd), "")
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return err
	}
	var firstErr error
	for _, name := range names {
		var st syscall.Stat_t
		if err := lstatAt(dirfd, name, &st); err != nil {
			continue
		}
		isDir := st.Mode&syscall.S_IFMT == syscall.S_IFDIR
		if uint64(st.Dev) != device || (!isDir && st.Nlink > 1) {
			continue // another filesystem, or a file that also lives outside the tree
		}
		// A file is chowned even when its owner is right: chown clears setuid, setgid and file
		// capabilities, which a root script could have put on it.
		if !isDir || int(st.Uid) != owner.uid || int(st.Gid) != owner.gid {
			if err := syscall.Fchownat(dirfd, name, owner.uid, owner.gid, atSymlinkNofollow); err != nil && firstErr == nil {
				firstErr = err
			}
		}
		if isDir && depth < maxGiveBackDepth {
			child, err := syscall.Openat(dirfd, name, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
			if err == nil {
				if err := giveBackAt(child, owner, device, depth+1); err != nil && firstErr == nil {
					firstErr = err
				}
			}
		}
	}
	return firstErr
}

// lstatAt is fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW), which package syscall lacks on some
// architectures: an O_PATH descriptor of the entry itself (a symlink is not followed).
func lstatAt(dirfd int, name string, st *syscall.Stat_t) error {
	fd, err := syscall.Openat(dirfd, name, oPath|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	return syscall.Fstat(fd, st)
}

// unsafeForTarget names what is not passed from the login side's environment to a script
// that runs as another user: the variables that make a dynamic loader, a shell or an
// interpreter run code or read files the login session chose (sudo's env_reset removes them,
// and they must not come back through the spec). Names ending in "*" are prefixes.
var unsafeForTarget = []string{
	"LD_*", "_RLD*", "GCONV_PATH", "LOCPATH", "NLSPATH", "PATH_LOCALE", "HOSTALIASES", "LOCALDOMAIN",
	"RES_OPTIONS", "IFS", "CDPATH", "ENV", "BASH_ENV", "BASH_FUNC_*", "SHELLOPTS", "BASHOPTS", "PS4",
	"GLOBIGNORE", "FPATH", "ZDOTDIR", "NULLCMD", "READNULLCMD", "TMPPREFIX", "TERMINFO", "TERMINFO_DIRS",
	"TERMPATH", "TERMCAP", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONUSERBASE",
	"PERLLIB", "PERL5LIB", "PERL5OPT", "PERL5DB", "PERLIO_DEBUG", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS",
	"NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "GIT_EXEC_PATH",
}

// unmountUnder detaches every mount below dir (deepest first): what a root script mounted in
// its work dir and could not unmount because it was stopped. Mount points come from
// /proc/self/mountinfo (field 5, with space, tab, newline and backslash octal-escaped).
func unmountUnder(dir string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	prefix := strings.TrimSuffix(dir, "/") + "/"
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		point := mountinfoUnescape(fields[4])
		if strings.HasPrefix(point, prefix) {
			points = append(points, point)
		}
	}
	var firstErr error
	for i := len(points) - 1; i >= 0; i-- { // mountinfo lists parents before their children
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil && err != syscall.EINVAL && firstErr == nil {
			firstErr = fmt.Errorf("cannot detach %s: %v", points[i], err)
		}
	}
	return firstErr
}

func mountinfoUnescape(field string) string {
	var out strings.Builder
	for i := 0; i < len(field); i++ {
		if field[i] == '\\' && i+3 < len(field) {
			if n, err := strconv.ParseUint(field[i+1:i+4], 8, 8); err == nil {
				out.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		out.WriteByte(field[i])
	}
	return out.String()
}

func unsafeVariable(name string) bool {
	for _, pattern := range unsafeForTarget {
		if prefix, isPrefix := strings.CutSuffix(pattern, "*"); isPrefix && strings.HasPrefix(name, prefix) || name == pattern {
			return true
		}
	}
	return false
}

// targetEnv is the script's environment as the login side made it, with the target user's
// own HOME, USER and LOGNAME (a root script must not write into the login user's home by
// accident), and sudo's SUDO_* variables; without the unsafe variables above, and with PATH
// the helpers' bin dir followed by the PATH sudo gave become-exec (its secure_path), not the
// login user's (which may start with directories that user can write, ~/bin).
func targetEnv(env []string, helperDir string) []string {
	out := make([]string, 0, len(env)+6)
	override := map[string]string{}
	if u, err := user.Current(); err == nil {
		override["HOME"], override["USER"], override["LOGNAME"] = u.HomeDir, u.Username, u.Username
	}
	for _, name := range []string{"SUDO_USER", "SUDO_UID", "SUDO_GID"} {
		if value, ok := os.LookupEnv(name); ok {
			override[name] = value
		}
	}
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	if helperDir != "" {
		path = filepath.Join(helperDir, "bin") + ":" + path
	}
	override["PATH"] = path
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if _, replaced := override[name]; !replaced && !unsafeVariable(name) {
			out = append(out, kv)
		}
	}
	for name, value := range override {
		out = append(out, name+"="+value)
	}
	return out
}

// passThrough is become-exec's reporter: the script's output goes straight to its own stdout
// and stderr (sudo's, read by the login side); messages have nowhere to go.
type passThrough struct{}

func (passThrough) Stream(kind byte, _ float64, data []byte) error {
	out := os.Stdout
	if kind != 'O' {
		out = os.Stderr
	}
	_, err := out.Write(data)
	return err
}

func (passThrough) Message(*pyjson.Object) error { return nil }
