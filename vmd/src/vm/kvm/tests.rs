//! Tiny guests on this machine's /dev/kvm.
