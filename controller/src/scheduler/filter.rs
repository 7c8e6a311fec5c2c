//! Whether a node can take one more task of a request.

use super::view::NodeSlot;
use super::{Request, Unfit};

/// A placement constraint on a node label: `key==value` or `key!=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub key: String,
    pub equal: bool,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placement constraint {0:?} is not KEY==VALUE or KEY!=VALUE")]
pub struct ConstraintError(pub String);

impl Constraint {
    pub fn parse(text: &str) -> Result<Constraint, ConstraintError> {
        let (key, value, equal) = if let Some((k, v)) = text.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = text.split_once("==") {
            (k, v, true)
        } else {
            return Err(ConstraintError(text.to_string()));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(ConstraintError(text.to_string()));
        }
        Ok(Constraint {
            key: key.to_string(),
            equal,
            value: value.to_string(),
        })
    }

    /// A node without the label matches `!=` and not `==`.
    pub fn matches(&self, node: &NodeSlot) -> bool {
        let has = node.labels.get(&self.key).is_some_and(|v| *v == self.value);
        has == self.equal
    }
}

pub(super) fn fits(node: &NodeSlot, req: &Request<'_>) -> Result<(), Unfit> {
    if !node.ready {
        return Err(Unfit::NotReady);
    }
    if node.drained {
        return Err(Unfit::Drained);
    }
    if !req.constraints.iter().all(|c| c.matches(node)) {
        return Err(Unfit::Constraints);
    }
    if req.cpu_millis > 0 && node.cpu_used + req.cpu_millis > node.cpu_capacity {
        return Err(Unfit::Cpu);
    }
    if req.memory_bytes > 0 && node.memory_used + req.memory_bytes > node.memory_capacity {
        return Err(Unfit::Memory);
    }
    if req.host_ports.iter().any(|p| node.ports.contains(p)) {
        return Err(Unfit::Port);
    }
    Ok(())
}
