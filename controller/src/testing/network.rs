//! An in-memory network for Raft nodes, in the spirit of raft-rs's `harness/src/network.rs`:
//! per-link drop rate, delay and reordering, partitions (isolate a node, or split the nodes into
//! groups), and heal. Messages are encoded and decoded on the way, as on a real wire. Random
//! choices come from a seeded generator, so a seed replays the same fault decisions (though task
//! timing still varies).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use protobuf::Message as PbMessage;
use raft::eraftpb::Message;

use crate::raft::{Mailbox, Transport};

/// Faults on a link (or on every link).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkFaults {
    /// Probability in [0, 1] that a message is lost.
    pub drop_rate: f64,
    /// Every message is delayed by a uniform random time in [min_delay, max_delay].
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Probability that a message is held back an extra `2 * max_delay` (+1 ms), so later
    /// messages overtake it.
    pub reorder_rate: f64,
}

/// Message counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub dropped: u64,
}

/// A network of node mailboxes. Cloning shares it.
#[derive(Debug, Clone)]
pub struct MemNetwork {
    inner: Arc<Mutex<NetState>>,
}

#[derive(Debug)]
struct NetState {
    mailboxes: HashMap<u64, Mailbox>,
    faults: LinkFaults,
    links: HashMap<(u64, u64), LinkFaults>,
    /// Partition group per node; nodes in different groups cannot talk. Absent = group 0.
    groups: HashMap<u64, u64>,
    next_group: u64,
    rng: SplitMix64,
    stats: NetStats,
}

impl NetState {
    fn connected(&self, from: u64, to: u64) -> bool {
        self.groups.get(&from).copied().unwrap_or(0) == self.groups.get(&to).copied().unwrap_or(0)
    }
}

impl MemNetwork {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(NetState {
                mailboxes: HashMap::new(),
                faults: LinkFaults::default(),
                links: HashMap::new(),
                groups: HashMap::new(),
                next_group: 1,
                rng: SplitMix64(seed),
                stats: NetStats::default(),
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, NetState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Attaches (or re-attaches, after a restart) a node's mailbox.
    pub fn register(&self, mailbox: Mailbox) {
        self.state().mailboxes.insert(mailbox.node_id(), mailbox);
    }

    /// The transport node `from` sends through.
    pub fn transport(&self, from: u64) -> Arc<dyn Transport> {
        Arc::new(MemTransport {
            from,
            net: self.clone(),
        })
    }

    /// Faults on every link without its own setting.
    pub fn set_faults(&self, faults: LinkFaults) {
        self.state().faults = faults;
    }

    /// Faults on the one-way link `from -> to`.
    pub fn set_link_faults(&self, from: u64, to: u64, faults: LinkFaults) {
        self.state().links.insert((from, to), faults);
    }

    /// Cuts `id` off from every other node.
    pub fn isolate(&self, id: u64) {
        let mut st = self.state();
        let group = st.next_group;
        st.next_group += 1;
        st.groups.insert(id, group);
    }

    /// Splits the nodes into groups that cannot talk to each other; nodes not listed stay
    /// together in the default group.
    pub fn partition(&self, groups: &[&[u64]]) {
        let mut st = self.state();
        st.groups.clear();
        for members in groups {
            let group = st.next_group;
            st.next_group += 1;
            for id in *members {
                st.groups.insert(*id, group);
            }
        }
    }

    /// Removes every partition and fault.
    pub fn heal(&self) {
        let mut st = self.state();
        st.groups.clear();
        st.links.clear();
        st.faults = LinkFaults::default();
    }

    pub fn stats(&self) -> NetStats {
        self.state().stats
    }

    fn route(&self, from: u64, msg: Message) {
        let to = msg.to;
        let delay = {
            let mut st = self.state();
            st.stats.sent += 1;
            let faults = st.links.get(&(from, to)).copied().unwrap_or(st.faults);
            if !st.connected(from, to)
                || !st.mailboxes.contains_key(&to)
                || (faults.drop_rate > 0.0 && st.rng.next_f64() < faults.drop_rate)
            {
                st.stats.dropped += 1;
                return;
            }
            let spread = faults.max_delay.saturating_sub(faults.min_delay);
            let mut delay = faults.min_delay + spread.mul_f64(st.rng.next_f64());
            if faults.reorder_rate > 0.0 && st.rng.next_f64() < faults.reorder_rate {
                delay += faults.max_delay * 2 + Duration::from_millis(1);
            }
            delay
        };
        // Through the wire format, as a real transport would.
        let msg = match msg
            .write_to_bytes()
            .and_then(|bytes| Message::parse_from_bytes(&bytes))
        {
            Ok(msg) => msg,
            Err(e) => {
                tracing::error!(from, to, error = %e, "test network: message does not round-trip");
                self.state().stats.dropped += 1;
                return;
            }
        };
        if delay.is_zero() {
            self.deliver(from, msg);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.state().stats.dropped += 1;
            return;
        };
        let net = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            net.deliver(from, msg);
        });
    }

    fn deliver(&self, from: u64, msg: Message) {
        let to = msg.to;
        let mailbox = {
            let mut st = self.state();
            // A partition made while the message was in flight still cuts it.
            match st.mailboxes.get(&to).cloned() {
                Some(mb) if st.connected(from, to) => mb,
                _ => {
                    st.stats.dropped += 1;
                    return;
                }
            }
        };
        let delivered = mailbox.deliver(msg).is_ok();
        let mut st = self.state();
        if delivered {
            st.stats.delivered += 1;
        } else {
            st.stats.dropped += 1;
        }
    }
}

struct MemTransport {
    from: u64,
    net: MemNetwork,
}

impl Transport for MemTransport {
    fn send(&self, msgs: Vec<Message>) {
        for msg in msgs {
            self.net.route(self.from, msg);
        }
    }
}

/// A small, seedable generator (SplitMix64); plenty for fault injection.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn message(from: u64, to: u64, index: u64) -> Message {
        Message {
            from,
            to,
            index,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn partitions_drop_and_heal_restores() {
        let net = MemNetwork::new(1);
        let (tx, mut rx) = mpsc::channel(16);
        net.register(Mailbox::new(2, tx));
        let t = net.transport(1);
        t.send(vec![message(1, 2, 1)]);
        assert_eq!(rx.try_recv().map(|m| m.index).ok(), Some(1));
        net.isolate(2);
        t.send(vec![message(1, 2, 2)]);
        assert!(rx.try_recv().is_err());
        net.heal();
        t.send(vec![message(1, 2, 3)]);
        assert_eq!(rx.try_recv().map(|m| m.index).ok(), Some(3));
        assert_eq!(
            net.stats(),
            NetStats {
                sent: 3,
                delivered: 2,
                dropped: 1
            }
        );
    }

    #[tokio::test]
    async fn drop_rate_is_roughly_honoured_and_seeded() {
        let run = |seed| {
            let net = MemNetwork::new(seed);
            let (tx, mut rx) = mpsc::channel(1000);
            net.register(Mailbox::new(2, tx));
            net.set_faults(LinkFaults {
                drop_rate: 0.3,
                ..LinkFaults::default()
            });
            let t = net.transport(1);
            t.send((0..1000).map(|i| message(1, 2, i)).collect());
            let mut got = Vec::new();
            while let Ok(m) = rx.try_recv() {
                got.push(m.index);
            }
            got
        };
        let a = run(7);
        assert!((600..800).contains(&a.len()), "{} delivered", a.len());
        assert_eq!(a, run(7), "same seed, same drops");
    }

    #[tokio::test]
    async fn delays_reorder_messages() {
        let net = MemNetwork::new(3);
        let (tx, mut rx) = mpsc::channel(100);
        net.register(Mailbox::new(2, tx));
        net.set_link_faults(
            1,
            2,
            LinkFaults {
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(20),
                ..LinkFaults::default()
            },
        );
        net.transport(1)
            .send((0..50).map(|i| message(1, 2, i)).collect());
        let mut got = Vec::new();
        while got.len() < 50 {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Some(m)) => got.push(m.index),
                _ => break,
            }
        }
        assert_eq!(got.len(), 50);
        assert!(got.windows(2).any(|w| w[0] > w[1]), "some reordering");
    }
}
