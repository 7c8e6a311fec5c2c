//! The image store (DESIGN.md, "Agent"): pulls images from any OCI distribution registry,
//! verifies every blob's digest while it streams in, unpacks each layer once (keyed by chain id,
//! whiteouts in overlayfs form, nothing escaping its layer), and mounts container root
//! filesystems as overlays of those layers.

pub mod credentials;
pub mod digest;
pub mod durability;
pub mod error;
pub mod fetch;
pub mod gc;
pub mod layout;
pub mod manifest;
pub mod platform;
pub mod progress;
pub mod record;
pub mod reference;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use credentials::{CredentialStore, Credentials};
pub use digest::Digest;
pub use error::ImageError;
pub use platform::Platform;
pub use progress::{Progress, PullEvent};
pub use record::{ImageRecord, LayerRecord};
pub use reference::ImageRef;
pub use rootfs::{Rootfs, mount_rootfs, remove_rootfs, unmount_rootfs};
pub use store::{ImageStore, StoreConfig};
