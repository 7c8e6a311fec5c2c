//! tug's container networking (see `DESIGN.md`, "Network").
//!
//! Per node a bridge `tug0`; per container a veth pair with `eth0` inside the container's network
//! namespace, an address from node-local IPAM, and a default route via the bridge; routes or VXLAN
//! to the other nodes' subnets; masquerade, published ports and service DNS. Add, del and check
//! follow CNI semantics. Depends on nothing else of tug's.
//!
//! Not built yet: arrives with the "Networking" issue.
