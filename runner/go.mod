module cronium/runner

go 1.27
