//! The text of a container's `/etc/hosts` and `/etc/resolv.conf`. Only the content: the agent
//! writes it into the rootfs, where it knows the mount layout.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};

/// `/etc/hosts` with loopback entries and `hostname` at `address`, then `extra` (name, address)
/// lines in the order given.
pub fn hosts(hostname: &str, address: Ipv4Addr, extra: &[(&str, IpAddr)]) -> String {
    let mut text = String::from(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         ff00::0\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    let _ = writeln!(text, "{address}\t{hostname}");
    for (name, addr) in extra {
        let _ = writeln!(text, "{addr}\t{name}");
    }
    text
}

/// `/etc/resolv.conf` naming `nameservers` (normally the bridge address, where the agent answers
/// service names), with `search` domains and `options` (e.g. `ndots:2`) when given.
pub fn resolv_conf(nameservers: &[IpAddr], search: &[&str], options: &[&str]) -> String {
    let mut text = String::new();
    for ns in nameservers {
        let _ = writeln!(text, "nameserver {ns}");
    }
    if !search.is_empty() {
        let _ = writeln!(text, "search {}", search.join(" "));
    }
    if !options.is_empty() {
        let _ = writeln!(text, "options {}", options.join(" "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_has_loopback_self_and_extras() {
        let text = hosts(
            "web-1",
            Ipv4Addr::new(10, 88, 3, 2),
            &[("db", IpAddr::V4(Ipv4Addr::new(10, 88, 4, 9)))],
        );
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(text.contains("\n10.88.3.2\tweb-1\n"));
        assert!(text.ends_with("10.88.4.9\tdb\n"));
    }

    #[test]
    fn resolv_conf_lists_servers_search_options() {
        let text = resolv_conf(
            &[IpAddr::V4(Ipv4Addr::new(10, 88, 3, 1))],
            &["default.svc.tug", "svc.tug"],
            &["ndots:2"],
        );
        assert_eq!(
            text,
            "nameserver 10.88.3.1\nsearch default.svc.tug svc.tug\noptions ndots:2\n"
        );
        assert_eq!(resolv_conf(&[], &[], &[]), "");
    }
}
