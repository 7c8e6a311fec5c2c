//! What a node reports about itself after every Ready cycle.
//!
//! Watchers are woken when the role, leader, term or membership changes (what they wait for);
//! the indices are kept current for whoever reads the status, without waking anyone.

/// The node's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl From<raft::StateRole> for Role {
    fn from(role: raft::StateRole) -> Self {
        match role {
            raft::StateRole::Follower => Self::Follower,
            raft::StateRole::PreCandidate => Self::PreCandidate,
            raft::StateRole::Candidate => Self::Candidate,
            raft::StateRole::Leader => Self::Leader,
        }
    }
}

/// A node's view of the group (for cluster status, metrics and tests).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub role: Role,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// First entry still in the log (everything before is only in the snapshot).
    pub first_index: u64,
    pub last_index: u64,
    /// Index of the latest state-machine snapshot.
    pub snapshot_index: u64,
    /// Current voters, sorted.
    pub voters: Vec<u64>,
    /// Current learners, sorted.
    pub learners: Vec<u64>,
}

impl NodeStatus {
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// Whether this node is (still) a member of the group.
    pub fn is_member(&self) -> bool {
        self.voters.contains(&self.id) || self.learners.contains(&self.id)
    }

    /// Whether `other` differs in what status watchers wait for: role, leader, term or
    /// membership. The indices move with every write; a change of them alone wakes no one.
    pub fn role_differs(&self, other: &NodeStatus) -> bool {
        self.id != other.id
            || self.role != other.role
            || self.leader_id != other.leader_id
            || self.term != other.term
            || self.voters != other.voters
            || self.learners != other.learners
    }
}
