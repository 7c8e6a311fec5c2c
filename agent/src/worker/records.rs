//! What the worker keeps on disk under `DATA/worker/tasks/` so that a restarted agent resumes
//! supervising without a controller: each assigned task (`<id>.pb`, the protobuf as received)
//! and its supervisor state (`<id>.json`: restart count, whether the restart policy is done).
//! The containers themselves survive on their own (runtime state dirs and monitors).

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};
use tug_api::v1::Task;

use super::error::WorkerError;
use crate::runtime::state::{read_json, write_json};

/// Supervisor state of one task that must outlive the agent process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    /// Restarts of the container on this node so far.
    pub restart_count: u32,
    /// The restart policy is done with it (exited for good, or failed): do not start it again.
    pub finished: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct TaskFiles {
    dir: PathBuf,
}

impl TaskFiles {
    pub(crate) fn open(data_dir: &Path) -> Result<TaskFiles, WorkerError> {
        let dir = data_dir.join("worker").join("tasks");
        fs::create_dir_all(&dir).map_err(|source| WorkerError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(TaskFiles { dir })
    }

    fn task_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pb"))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Replace the task's saved copy (write, rename).
    pub(crate) fn save_task(&self, task: &Task) -> std::io::Result<()> {
        let path = self.task_path(&task.id);
        let tmp = path.with_extension("pb.tmp");
        fs::write(&tmp, task.encode_to_vec())?;
        fs::rename(&tmp, &path)
    }

    /// Every saved task; unreadable files are skipped (and logged): the controller's next
    /// COMPLETE set says what is assigned anyway.
    pub(crate) fn load_tasks(&self) -> Vec<Task> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "pb") {
                continue;
            }
            match fs::read(&path).map(|raw| Task::decode(raw.as_slice())) {
                Ok(Ok(task)) => out.push(task),
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), cause = %e, "skipping a saved task")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "skipping a saved task")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub(crate) fn load_record(&self, id: &str) -> TaskRecord {
        read_json(&self.record_path(id)).unwrap_or_default()
    }

    pub(crate) fn save_record(&self, id: &str, record: &TaskRecord) {
        if let Err(e) = write_json(&self.record_path(id), record) {
            tracing::warn!(task = id, cause = %e, "cannot save the task's supervisor state");
        }
    }

    pub(crate) fn remove(&self, id: &str) {
        for path in [self.task_path(id), self.record_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), cause = %e, "cannot remove"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_and_records_round_trip() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let files = TaskFiles::open(dir.path())?;
        let task = Task {
            id: "web.1.abc".into(),
            namespace: "shop".into(),
            ..Default::default()
        };
        files.save_task(&task)?;
        let rec = TaskRecord {
            restart_count: 3,
            finished: false,
        };
        files.save_record(&task.id, &rec);
        assert_eq!(files.load_tasks(), std::slice::from_ref(&task));
        assert_eq!(files.load_record(&task.id), rec);
        assert_eq!(files.load_record("other"), TaskRecord::default());
        files.remove(&task.id);
        assert!(files.load_tasks().is_empty());
        Ok(())
    }
}
