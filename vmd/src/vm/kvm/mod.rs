//! The direct /dev/kvm backend (`backend kvm`).
//!
//! This file is a placeholder on the `virtio` branch: the kvm branch owns
//! the real one (vCPUs, memory, boot, ACPI, serial, the bus) and adds the
//! line below to it when the branches merge.

// Wired in by the monitor (the kvm branch); until then nothing calls it.
#[allow(dead_code)]
pub mod virtio;
