"""Fuzzing lmforge's readers of untrusted input (issue 12): `engine` runs isolated cases, `targets` builds and
mutates each format. `benchmarks/fuzz.py` runs the same cases by the thousand."""
