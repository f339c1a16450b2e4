//! The VMM: KVM VM and vCPUs, guest loading, serial console, control API (a later issue).
