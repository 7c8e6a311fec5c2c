//! Supervision of containers on the agent (DESIGN.md, "Agent"): when a container exits, whether
//! and when it starts again. The per-container monitor records exits; this decides.

pub mod restarts;
