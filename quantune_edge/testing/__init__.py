"""Test utilities that the test suite and the benchmarks share: a real OpenSSH sshd on loopback."""
