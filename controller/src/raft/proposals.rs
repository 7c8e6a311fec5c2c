//! Bookkeeping for requests waiting on the log: proposals keyed by the log index they were
//! appended at (and checked against the request id carried in the entry's context), and
//! ReadIndex reads keyed by their request id.

use std::collections::BTreeMap;

use tokio::sync::oneshot;

use super::handle::{Applied, Membership, ProposeError, ReadError};
use crate::fsm::CommandResult;
use crate::state::StoreError;

/// Request ids travel in entry and read contexts: this node's incarnation (random per start,
/// so ids never repeat across restarts) and a sequence number.
pub(crate) fn encode_ctx(incarnation: u64, seq: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(16);
    ctx.extend_from_slice(&incarnation.to_le_bytes());
    ctx.extend_from_slice(&seq.to_le_bytes());
    ctx
}

pub(crate) fn decode_ctx(ctx: &[u8]) -> Option<(u64, u64)> {
    if ctx.len() != 16 {
        return None;
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&ctx[..8]);
    b.copy_from_slice(&ctx[8..]);
    Some((u64::from_le_bytes(a), u64::from_le_bytes(b)))
}

/// Where a proposal's outcome goes.
#[derive(Debug)]
pub(crate) enum Reply {
    Command(oneshot::Sender<Result<Applied, ProposeError>>),
    Membership(oneshot::Sender<Result<Membership, ProposeError>>),
}

impl Reply {
    pub(crate) fn fail(self, err: ProposeError) {
        // The caller may have given up (timed out); nothing to do then.
        match self {
            Self::Command(tx) => {
                let _ = tx.send(Err(err));
            }
            Self::Membership(tx) => {
                let _ = tx.send(Err(err));
            }
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Self::Command(tx) => tx.is_closed(),
            Self::Membership(tx) => tx.is_closed(),
        }
    }
}

/// What applying one entry produced.
#[derive(Debug)]
pub(crate) enum Output {
    /// An entry without a command (a new leader's empty entry).
    Empty,
    Command(Result<CommandResult, StoreError>),
    Membership(Result<Membership, String>),
}

#[derive(Debug)]
struct Pending {
    term: u64,
    ctx: Vec<u8>,
    reply: Reply,
}

/// Proposals appended to the log by this node as leader, not yet applied.
#[derive(Debug, Default)]
pub(crate) struct Proposals {
    pending: BTreeMap<u64, Pending>,
}

impl Proposals {
    pub(crate) fn insert(&mut self, index: u64, term: u64, ctx: Vec<u8>, reply: Reply) {
        if let Some(old) = self.pending.insert(index, Pending { term, ctx, reply }) {
            old.reply.fail(ProposeError::Dropped { index });
        }
    }

    /// The entry at `index` (with `term` and `ctx`) was applied with `output`.
    pub(crate) fn resolve(&mut self, index: u64, term: u64, ctx: &[u8], output: Output) {
        // Anything below `index` still waiting was never applied as proposed.
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() >= index {
                break;
            }
            let (i, p) = entry.remove_entry();
            p.reply.fail(ProposeError::Dropped { index: i });
        }
        let Some(p) = self.pending.remove(&index) else {
            return;
        };
        if p.term != term || p.ctx != ctx {
            // A new leader overwrote our entry, or raft refused a conf change and put an
            // empty entry in its place.
            p.reply.fail(ProposeError::Dropped { index });
            return;
        }
        match (p.reply, output) {
            (Reply::Command(tx), Output::Command(Ok(result))) => {
                let _ = tx.send(Ok(Applied { index, result }));
            }
            (Reply::Command(tx), Output::Command(Err(e))) => {
                let _ = tx.send(Err(ProposeError::Rejected(e)));
            }
            (Reply::Membership(tx), Output::Membership(Ok(m))) => {
                let _ = tx.send(Ok(m));
            }
            (Reply::Membership(tx), Output::Membership(Err(reason))) => {
                let _ = tx.send(Err(ProposeError::MembershipChange(reason)));
            }
            (reply, _) => reply.fail(ProposeError::Dropped { index }),
        }
    }

    /// Fails every proposal at or below `index`.
    pub(crate) fn fail_through(&mut self, index: u64, err: impl Fn(u64) -> ProposeError) {
        let rest = self.pending.split_off(&(index + 1));
        for (i, p) in std::mem::replace(&mut self.pending, rest) {
            p.reply.fail(err(i));
        }
    }

    pub(crate) fn fail_all(&mut self, err: impl Fn(u64) -> ProposeError) {
        for (i, p) in std::mem::take(&mut self.pending) {
            p.reply.fail(err(i));
        }
    }

    /// Forgets proposals whose callers stopped waiting (they still apply if committed).
    pub(crate) fn purge_closed(&mut self) {
        self.pending.retain(|_, p| !p.reply.is_closed());
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[derive(Debug)]
struct PendingRead {
    reply: oneshot::Sender<Result<u64, ReadError>>,
    /// The commit index raft confirmed for this read, once known.
    index: Option<u64>,
    issued_tick: u64,
}

/// ReadIndex requests: first waiting for raft to confirm a commit index, then for the state
/// machine to apply up to it.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    pending: BTreeMap<u64, PendingRead>,
}

impl Reads {
    pub(crate) fn insert(
        &mut self,
        seq: u64,
        reply: oneshot::Sender<Result<u64, ReadError>>,
        tick: u64,
    ) {
        self.pending.insert(
            seq,
            PendingRead {
                reply,
                index: None,
                issued_tick: tick,
            },
        );
    }

    pub(crate) fn confirmed(&mut self, seq: u64, index: u64) {
        if let Some(r) = self.pending.get_mut(&seq)
            && r.index.is_none()
        {
            r.index = Some(index);
        }
    }

    /// Answers every read whose index is applied.
    pub(crate) fn resolve(&mut self, applied: u64) {
        let done: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in done {
            if let Some(r) = self.pending.remove(&seq) {
                let _ = r.reply.send(Ok(r.index.unwrap_or(applied)));
            }
        }
    }

    /// Reads still unconfirmed `after` ticks after they were (re)issued: raft drops a read
    /// when there is no leader, so these are issued again.
    pub(crate) fn due_for_retry(&mut self, tick: u64, after: u64) -> Vec<u64> {
        let mut due = Vec::new();
        for (seq, r) in &mut self.pending {
            if r.index.is_none() && tick.saturating_sub(r.issued_tick) >= after {
                r.issued_tick = tick;
                due.push(*seq);
            }
        }
        due
    }

    pub(crate) fn purge_closed(&mut self) {
        self.pending.retain(|_, r| !r.reply.is_closed());
    }

    pub(crate) fn fail_all(&mut self, err: impl Fn() -> ReadError) {
        for (_, r) in std::mem::take(&mut self.pending) {
            let _ = r.reply.send(Err(err()));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> (Reply, oneshot::Receiver<Result<Applied, ProposeError>>) {
        let (tx, rx) = oneshot::channel();
        (Reply::Command(tx), rx)
    }

    #[test]
    fn ctx_round_trips() {
        assert_eq!(decode_ctx(&encode_ctx(7, 9)), Some((7, 9)));
        assert_eq!(decode_ctx(b"short"), None);
    }

    #[test]
    fn a_matching_entry_resolves_and_a_different_one_drops() {
        let mut p = Proposals::default();
        let (r1, mut rx1) = command();
        let (r2, mut rx2) = command();
        let (r3, mut rx3) = command();
        p.insert(5, 2, encode_ctx(1, 1), r1);
        p.insert(6, 2, encode_ctx(1, 2), r2);
        p.insert(8, 2, encode_ctx(1, 3), r3);
        p.resolve(
            5,
            2,
            &encode_ctx(1, 1),
            Output::Command(Ok(CommandResult::Noop)),
        );
        assert!(matches!(rx1.try_recv(), Ok(Ok(Applied { index: 5, .. }))));
        // Index 6 was overwritten by another leader's entry (other term).
        p.resolve(6, 3, &[], Output::Empty);
        assert!(matches!(
            rx2.try_recv(),
            Ok(Err(ProposeError::Dropped { index: 6 }))
        ));
        p.fail_all(|_| ProposeError::LeadershipLost { leader_id: Some(2) });
        assert!(matches!(
            rx3.try_recv(),
            Ok(Err(ProposeError::LeadershipLost { .. }))
        ));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn reads_answer_once_applied() {
        let mut reads = Reads::default();
        let (tx, mut rx) = oneshot::channel();
        reads.insert(1, tx, 0);
        assert_eq!(reads.due_for_retry(5, 10), Vec::<u64>::new());
        assert_eq!(reads.due_for_retry(10, 10), vec![1]);
        reads.confirmed(1, 20);
        reads.resolve(19);
        assert!(rx.try_recv().is_err());
        reads.resolve(20);
        assert!(matches!(rx.try_recv(), Ok(Ok(20))));
        assert_eq!(reads.len(), 0);
    }
}
