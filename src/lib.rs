//! leasefs: a vhost-user virtio-fs daemon.
//!
//! Requests flow one way: the VMM kicks a virtqueue ([`device`]), its chains are popped and
//! completed by [`queue`], decoded and routed by [`fuse`], and served by the passthrough
//! filesystem ([`filesystem`]). [`daemon`] wires these together for one VMM connection;
//! [`sandbox`] confines the process first; [`cli`] holds virtiofsd's command line.

pub mod cli;
pub mod coherence;
pub mod daemon;
pub mod device;
pub mod fast_path;
pub mod filesystem;
pub mod frontend;
pub mod fuse;
pub mod metrics;
pub mod passthrough;
pub mod pidfile;
pub mod queue;
pub mod queue_poll;
pub mod request_ext;
pub mod sandbox;
pub mod seccomp;
