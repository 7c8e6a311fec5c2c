//! Service DNS: each node answers A queries for its cluster's services at the bridge address
//! (containers' `resolv.conf` names it) and forwards every other query to the node's own
//! resolvers.
//!
//! A service `web` in namespace `shop` answers as `web.shop.svc.tug`, `web.shop` and (for the
//! default namespace only, as the name alone is ambiguous) `web`; containers get the search
//! domains `<their namespace>.svc.tug svc.tug`, so `web` finds the service of their own namespace
//! first. An unknown name under `svc.tug` is NXDOMAIN without asking upstream. Answers carry a
//! short TTL: endpoints change as replicas come and go. Messages are parsed and built with the
//! `simple-dns` crate. Over UDP, a service answer that does not fit 512 bytes is cut and marked
//! truncated (so are large forwarded answers, as upstream sent them), and the client asks again
//! over TCP ([`serve_tcp`]), where answers go whole and other names are forwarded over TCP. Only
//! the node's containers (and loopback) are answered; at most 256 UDP forwards and 64 TCP
//! connections are served at once.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};
use tokio::net::UdpSocket;

use crate::subnet::Subnet;

/// The cluster's DNS domain.
pub const DOMAIN: &str = "svc.tug";
/// The default namespace, whose services also answer by bare name.
pub const DEFAULT_NAMESPACE: &str = "default";
/// TTL of service answers, seconds.
pub const TTL: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Service names → addresses; shared by the server and whoever learns the endpoints.
#[derive(Debug, Default)]
pub struct DnsTable {
    names: RwLock<HashMap<String, Vec<Ipv4Addr>>>,
}

impl DnsTable {
    /// Replaces every service: `(namespace, name, addresses)`.
    pub fn set_services<'a>(
        &self,
        services: impl IntoIterator<Item = (&'a str, &'a str, Vec<Ipv4Addr>)>,
    ) {
        let mut names = HashMap::new();
        for (namespace, name, addresses) in services {
            let namespace = if namespace.is_empty() {
                DEFAULT_NAMESPACE
            } else {
                namespace
            };
            let (ns, svc) = (namespace.to_ascii_lowercase(), name.to_ascii_lowercase());
            names.insert(format!("{svc}.{ns}.{DOMAIN}"), addresses.clone());
            names.insert(format!("{svc}.{ns}"), addresses.clone());
            if ns == DEFAULT_NAMESPACE {
                names.insert(svc, addresses);
            }
        }
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// The addresses of `name` (any case, trailing dot or not), if it is a service name.
    pub fn lookup(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
    }
}

/// The search domains of a container in `namespace`.
pub fn search_domains(namespace: &str) -> Vec<String> {
    let ns = if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    };
    vec![
        format!("{}.{DOMAIN}", ns.to_ascii_lowercase()),
        DOMAIN.to_string(),
    ]
}

/// The nameservers of a `resolv.conf` text (IPv4 and IPv6).
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Queries forwarded upstream at once; more are dropped (the client retries).
const MAX_FORWARDS: usize = 256;
/// Largest answer over UDP without EDNS.
const UDP_LIMIT: usize = 512;

/// Answer queries from `clients` (the node's containers) on `socket` until the future is dropped.
/// Anyone else is ignored: the server must not be an open resolver for whoever can route to the
/// bridge address.
pub async fn serve(
    socket: UdpSocket,
    clients: Subnet,
    table: Arc<DnsTable>,
    upstreams: Arc<Vec<SocketAddr>>,
) {
    let socket = Arc::new(socket);
    let forwards = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS));
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(cause = %e, "DNS receive failed");
                continue;
            }
        };
        if !is_client(from, clients) {
            continue;
        }
        let query = &buf[..len];
        match answer(query, &table, UDP_LIMIT) {
            Answer::Local(reply) => {
                let _ = socket.send_to(&reply, from).await;
            }
            Answer::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    tracing::debug!("too many DNS queries in flight upstream; dropping one");
                    continue;
                };
                let (socket, upstreams, query) =
                    (socket.clone(), upstreams.clone(), query.to_vec());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(reply) = forward(&query, &upstreams).await {
                        let _ = socket.send_to(&reply, from).await;
                    }
                });
            }
            Answer::Drop => {}
        }
    }
}

/// Whether a query from `from` is served: the node's containers and loopback only.
fn is_client(from: SocketAddr, clients: Subnet) -> bool {
    match from.ip() {
        std::net::IpAddr::V4(ip) => clients.contains(ip) || ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback(),
    }
}

/// Most TCP connections served at once.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Answer length-prefixed queries over TCP (RFC 7766) from `clients` on `listener`, for answers
/// that do not fit UDP; other names are forwarded to the upstreams over TCP.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    clients: Subnet,
    table: Arc<DnsTable>,
    upstreams: Arc<Vec<SocketAddr>>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((conn, from)) = listener.accept().await else {
            continue;
        };
        if !is_client(from, clients) {
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let (table, upstreams) = (table.clone(), upstreams.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_connection(conn, &table, &upstreams).await {
                tracing::debug!(cause = %e, "DNS over TCP connection ended");
            }
        });
    }
}

async fn tcp_connection(
    mut conn: tokio::net::TcpStream,
    table: &DnsTable,
    upstreams: &[SocketAddr],
) -> std::io::Result<()> {
    loop {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await else {
            return Ok(());
        };
        let query = query?;
        let reply = match answer(&query, table, usize::from(u16::MAX)) {
            Answer::Local(reply) => Some(reply),
            Answer::Forward => forward_tcp(&query, upstreams).await,
            Answer::Drop => return Ok(()),
        };
        if let Some(reply) = reply {
            write_framed(&mut conn, &reply).await?;
        }
    }
}

async fn read_framed(conn: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let len = conn.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    conn.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_framed(conn: &mut tokio::net::TcpStream, message: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("DNS message longer than 65535 bytes"))?;
    conn.write_all(&len.to_be_bytes()).await?;
    conn.write_all(message).await
}

async fn forward_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let exchange = async {
            let mut conn = tokio::net::TcpStream::connect(upstream).await?;
            write_framed(&mut conn, query).await?;
            read_framed(&mut conn).await
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
            Ok(Ok(reply)) => return Some(reply),
            _ => tracing::debug!(%upstream, "no DNS answer over TCP from upstream"),
        }
    }
    None
}

enum Answer {
    Local(Vec<u8>),
    Forward,
    Drop,
}

/// The answer to `query`; a local answer longer than `limit` bytes is cut and marked truncated.
fn answer(query: &[u8], table: &DnsTable, limit: usize) -> Answer {
    let Ok(packet) = Packet::parse(query) else {
        return Answer::Drop;
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Answer::Drop;
    }
    let Some(question) = packet.questions.first() else {
        return Answer::Drop;
    };
    let name = question.qname.to_string();
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let ours = lower == DOMAIN || lower.ends_with(&format!(".{DOMAIN}"));
    let found = table.lookup(&lower);
    if found.is_none() && !ours {
        return Answer::Forward;
    }
    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE);
    }
    reply.questions.push(question.clone());
    match found {
        None => *reply.rcode_mut() = RCODE::NameError,
        Some(addresses) => {
            let wants_a = matches!(question.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY);
            if wants_a {
                for addr in addresses {
                    reply.answers.push(ResourceRecord::new(
                        Name::new_unchecked(&name),
                        CLASS::IN,
                        TTL,
                        RData::A(A {
                            address: u32::from(addr),
                        }),
                    ));
                }
            }
        }
    }
    match reply.build_bytes_vec_compressed() {
        Ok(bytes) if bytes.len() <= limit => Answer::Local(bytes),
        Ok(_) => {
            // Too many replicas for one answer: the first ones, marked truncated.
            reply.answers.truncate(limit / 20);
            reply.set_flags(PacketFlag::TRUNCATION);
            reply
                .build_bytes_vec_compressed()
                .map_or(Answer::Drop, Answer::Local)
        }
        Err(_) => Answer::Drop,
    }
}

async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.send_to(query, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv_from(&mut buf)).await {
            Ok(Ok((len, from))) if from == *upstream => {
                buf.truncate(len);
                return Some(buf);
            }
            _ => tracing::debug!(%upstream, "no DNS answer from upstream"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::Question;

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(7);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap_or_default()
    }

    fn addresses(reply: &[u8]) -> (RCODE, Vec<Ipv4Addr>) {
        let Ok(p) = Packet::parse(reply) else {
            return (RCODE::ServerFailure, vec![]);
        };
        let addrs = p
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        (p.rcode(), addrs)
    }

    fn answer_udp(query: &[u8], table: &DnsTable) -> Answer {
        answer(query, table, UDP_LIMIT)
    }

    #[tokio::test]
    async fn tcp_answers_length_prefixed_queries_from_clients_only()
    -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let at = listener.local_addr()?;
        let clients: Subnet = "10.88.0.0/24".parse()?;
        let server = tokio::spawn(serve_tcp(
            listener,
            clients,
            Arc::new(table()),
            Arc::new(Vec::new()),
        ));
        let mut conn = tokio::net::TcpStream::connect(at).await?;
        for _ in 0..2 {
            let q = query("web", TYPE::A);
            conn.write_all(&(q.len() as u16).to_be_bytes()).await?;
            conn.write_all(&q).await?;
            let len = conn.read_u16().await? as usize;
            let mut reply = vec![0u8; len];
            conn.read_exact(&mut reply).await?;
            assert_eq!(addresses(&reply).1.len(), 2);
        }
        server.abort();
        Ok(())
    }

    #[test]
    fn big_answers_are_truncated_over_udp_and_whole_over_tcp() {
        let t = DnsTable::default();
        let many: Vec<Ipv4Addr> = (0..200u8).map(|i| Ipv4Addr::new(10, 88, 1, i)).collect();
        t.set_services([("", "big", many)]);
        let q = query("big", TYPE::A);
        let Answer::Local(udp) = answer_udp(&q, &t) else {
            panic!("not answered locally");
        };
        assert!(udp.len() <= UDP_LIMIT);
        let parsed = Packet::parse(&udp).map(|p| p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(parsed.ok(), Some(true));
        let Answer::Local(tcp) = answer(&q, &t, usize::from(u16::MAX)) else {
            panic!("not answered locally");
        };
        assert_eq!(addresses(&tcp).1.len(), 200);
    }

    fn table() -> DnsTable {
        let t = DnsTable::default();
        t.set_services([
            (
                "",
                "web",
                vec![Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 1, 2)],
            ),
            ("shop", "db", vec![Ipv4Addr::new(10, 88, 2, 7)]),
            ("shop", "idle", vec![]),
        ]);
        t
    }

    #[test]
    fn services_answer_by_their_three_names() {
        let t = table();
        for name in [
            "web",
            "web.default",
            "web.default.svc.tug.",
            "WEB.Default.SVC.tug",
        ] {
            let Answer::Local(reply) = answer_udp(&query(name, TYPE::A), &t) else {
                panic!("{name} was not answered locally");
            };
            assert_eq!(addresses(&reply).1.len(), 2, "{name}");
        }
        let Answer::Local(reply) = answer_udp(&query("db.shop", TYPE::A), &t) else {
            panic!("db.shop was not answered locally");
        };
        assert_eq!(
            addresses(&reply),
            (RCODE::NoError, vec![Ipv4Addr::new(10, 88, 2, 7)])
        );
        // Only the default namespace answers by bare name.
        assert!(matches!(
            answer_udp(&query("db", TYPE::A), &t),
            Answer::Forward
        ));
    }

    #[test]
    fn unknown_cluster_names_are_nxdomain_and_others_are_forwarded() {
        let t = table();
        let Answer::Local(reply) = answer_udp(&query("nope.shop.svc.tug", TYPE::A), &t) else {
            panic!("not answered locally");
        };
        assert_eq!(addresses(&reply).0, RCODE::NameError);
        // A service without ready replicas: the name exists, with no address.
        let Answer::Local(reply) = answer_udp(&query("idle.shop.svc.tug", TYPE::A), &t) else {
            panic!("not answered locally");
        };
        assert_eq!(addresses(&reply), (RCODE::NoError, vec![]));
        // AAAA for a service: no IPv6 addresses, no error.
        let Answer::Local(reply) = answer_udp(&query("web", TYPE::AAAA), &t) else {
            panic!("not answered locally");
        };
        assert_eq!(addresses(&reply), (RCODE::NoError, vec![]));
        assert!(matches!(
            answer_udp(&query("deb.debian.org", TYPE::A), &t),
            Answer::Forward
        ));
        assert!(matches!(answer_udp(b"garbage", &t), Answer::Drop));
    }

    #[test]
    fn resolv_conf_and_search_domains() {
        assert_eq!(
            nameservers("# x\nnameserver 10.0.0.1\nnameserver ::1\nsearch a\n"),
            vec![
                "10.0.0.1:53"
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|_| unreachable!()),
                "[::1]:53"
                    .parse::<SocketAddr>()
                    .unwrap_or_else(|_| unreachable!()),
            ]
        );
        assert_eq!(search_domains("Shop"), ["shop.svc.tug", "svc.tug"]);
        assert_eq!(search_domains(""), ["default.svc.tug", "svc.tug"]);
    }
}
