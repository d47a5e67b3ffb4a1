"""Shared training prefixes: runs that agree until their method's start epoch T train [0, T) once.

`keys` says which runs share (the prefix key and fork epoch), `store` where prefixes live on disk
(the sweep or ablation directory, and a content-addressed cache later commands reuse), `board` is the
Ray actor that hands each prefix to exactly one trainer while its dependents wait, and `fork` is
what a trial or ablation run calls to get its starting trainer.
"""

#: history / result columns: 1 on the epochs a forked run took from its shared prefix; the prefix key it forked
SHARED_PREFIX = "prefix/shared"
PREFIX_KEY = "prefix/key"
