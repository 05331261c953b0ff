package sha256

import (
	std "crypto/sha256"
	"math/rand/v2"
	"testing"
)

func TestMatchesTheStandardLibrary(t *testing.T) {
	if Hex([]byte("abc")) != "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
		t.Fatal("abc")
	}
	data := make([]byte, 300000)
	for i := range data {
		data[i] = byte(rand.Uint32())
	}
	for n := 0; n < 300; n++ { // every tail length, and some long inputs
		for _, size := range []int{n, n * 997} {
			if Sum256(data[:size]) != std.Sum256(data[:size]) {
				t.Fatalf("differs for %d bytes", size)
			}
		}
	}
}
