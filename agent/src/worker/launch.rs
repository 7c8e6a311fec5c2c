//! From a pulled image to a created container: mount its rootfs under `DATA/rootfs/<id>`,
//! build the OCI spec, create the container. Shared by the worker and `tug run`, so both make
//! containers the same way and `tug ps`/`tug rm` understand either's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::image::{ImageError, ImageRecord, ImageStore, Rootfs, mount_rootfs, remove_rootfs};
use crate::runtime::container::{ContainerError, Runtime};
use crate::runtime::spec::{self, ContainerConfig, SpecError};
use crate::runtime::state::{RuntimeOptions, State};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error("{} exists already: remove it or pick another name", .0.display())]
    RootfsExists(PathBuf),
    #[error("remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to create.
#[derive(Debug, Clone)]
pub struct Launch {
    pub id: String,
    pub config: ContainerConfig,
    /// Added to the spec's annotations (`tug.image`, `tug.task`, ...).
    pub annotations: BTreeMap<String, String>,
    pub options: RuntimeOptions,
}

/// A created container (its process waits for `start`) and what it was made from, kept to
/// create it again after an exit.
#[derive(Debug, Clone)]
pub struct Launched {
    pub spec: Spec,
    pub options: RuntimeOptions,
    pub rootfs: Rootfs,
    pub state: State,
}

/// `DATA/rootfs/<id>`: the container's overlay mount point, upper and work dirs.
pub fn rootfs_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("rootfs").join(id)
}

/// Mount the rootfs of `record`, build the spec and create the container. Blocking. On any
/// failure nothing is left behind (no mount, no state dir).
pub fn create(
    store: &ImageStore,
    runtime: &Runtime,
    data_dir: &Path,
    record: &ImageRecord,
    launch: Launch,
) -> Result<Launched, LaunchError> {
    let image_config = store.config(record)?;
    let dir = rootfs_dir(data_dir, &launch.id);
    if dir.exists() {
        return Err(LaunchError::RootfsExists(dir));
    }
    let rootfs = mount_rootfs(&store.layer_dirs(record)?, &dir)?;
    let created = (|| -> Result<Launched, LaunchError> {
        let mut spec = spec::build(&image_config, &launch.config, &rootfs.path)?;
        let mut annotations = spec.annotations().clone().unwrap_or_default();
        annotations.extend(launch.annotations);
        spec.set_annotations(Some(annotations));
        let state = runtime.create(&launch.id, &spec, &launch.options)?;
        Ok(Launched {
            spec,
            options: launch.options,
            rootfs: rootfs.clone(),
            state,
        })
    })();
    if created.is_err()
        && let Err(e) = remove_rootfs_of(data_dir, &launch.id)
    {
        tracing::warn!(container = %launch.id, cause = %e, "cleanup after a failed create");
    }
    created
}

/// Unmount and delete `DATA/rootfs/<id>` (nothing to do if it is not there).
pub fn remove_rootfs_of(data_dir: &Path, id: &str) -> Result<(), LaunchError> {
    let dir = rootfs_dir(data_dir, id);
    if !dir.exists() {
        return Ok(());
    }
    remove_rootfs(&Rootfs {
        path: dir.join("rootfs"),
        upper: dir.join("upper"),
        work: dir.join("work"),
    })?;
    std::fs::remove_dir_all(&dir).map_err(|source| LaunchError::Remove { path: dir, source })
}
