//! Running netlink work inside another network namespace. `setns(2)` changes only the calling
//! thread, and a netlink socket stays in the namespace it was created in, so the work runs on a
//! dedicated std thread that enters the namespace, builds its own current-thread tokio runtime and
//! opens its own sockets there. The thread is joined before the result is returned: nothing
//! lingers, and the caller's threads never change namespace.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

/// Run `work` inside the network namespace at `path` (e.g. `/run/netns/NAME` or
/// `/proc/PID/ns/net`) and wait for it, blocking the calling thread. For callers without an async
/// runtime (tests, the per-container monitor).
pub fn block_in_netns<F, Fut, T>(path: &Path, work: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    let file = open_netns(path)?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("tug-netns".into())
            .spawn_scoped(scope, || run_entered(&file, path, work))
            .map_err(|source| Error::Netns {
                what: "start a helper thread for",
                path: path.to_path_buf(),
                source,
            })?;
        thread.join().map_err(|_| Error::NetnsThread {
            path: path.to_path_buf(),
        })?
    })
}

/// Run `work` inside the network namespace at `path` without blocking the caller's runtime: the
/// helper thread reports back over a channel and is joined once it has sent its result.
pub async fn in_netns<F, Fut, T>(path: &Path, work: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let file = open_netns(path)?;
    let owned: PathBuf = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("tug-netns".into())
        .spawn(move || {
            let result = run_entered(&file, &owned, work);
            // the receiver is gone only if the caller was cancelled; the result is moot then
            let _ = tx.send(result);
        })
        .map_err(|source| Error::Netns {
            what: "start a helper thread for",
            path: path.to_path_buf(),
            source,
        })?;
    let result = rx.await;
    // The thread has sent its result and is returning: joining takes microseconds.
    let joined = thread.join();
    match (result, joined) {
        (Ok(result), Ok(())) => result,
        _ => Err(Error::NetnsThread {
            path: path.to_path_buf(),
        }),
    }
}

/// Open a namespace file; the error says which namespace is missing.
pub(crate) fn open_netns(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Netns {
        what: "open",
        path: path.to_path_buf(),
        source,
    })
}

/// On the helper thread: enter the namespace, then drive `work` on a fresh current-thread runtime
/// (dropped, with every task it spawned, before the thread ends).
fn run_entered<F, Fut, T>(file: &File, path: &Path, work: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|errno| Error::Netns {
        what: "enter",
        path: path.to_path_buf(),
        source: errno.into(),
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| Error::Netns {
            what: "start a runtime inside",
            path: path.to_path_buf(),
            source,
        })?;
    runtime.block_on(work())
}
