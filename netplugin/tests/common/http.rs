//! HTTP between test namespaces with busybox: a server in a container, fetches with retries,
//! and an 8 MiB transfer checked byte for byte.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::cluster::Node;
use super::{TestNs, TestResult};

/// `url` fetched from inside `ns` with busybox wget, tried `attempts` times 100 ms apart (the
/// server may still be starting), each given 10 s; the body, or wget's last complaint.
pub fn fetch(ns: &TestNs, url: &str, attempts: usize) -> TestResult<Result<Vec<u8>, String>> {
    let mut last = String::new();
    for _ in 0..attempts {
        // timeout(1), not wget's -T: Debian's busybox wget crashes with that.
        let out = Command::new("ip")
            .args(["netns", "exec", ns.name(), "timeout", "-s", "KILL", "10"])
            .args(["busybox", "wget", "-q", "-O", "-", url])
            .output()?;
        if out.status.success() {
            return Ok(Ok(out.stdout));
        }
        last = format!(
            "{} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(Err(last))
}

/// busybox httpd in a node's container, stopped (by PID) on drop.
pub struct Httpd(Child);

impl Httpd {
    pub fn start(node: &Node, dir: &Path) -> TestResult<Httpd> {
        Httpd::start_in(&node.ctr, dir)
    }

    pub fn start_in(ns: &TestNs, dir: &Path) -> TestResult<Httpd> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "busybox",
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Httpd(child))
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 8 MiB written into `dir` (served by an `Httpd` in the other node's container at `to`),
/// fetched over HTTP from `from`'s container: TCP with segmentation offloads arrives intact.
pub fn transfer(from: &Node, to: std::net::Ipv4Addr, dir: &Path) -> TestResult {
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("blob"), &data)?;
    let url = format!("http://{to}:8080/blob");
    let fetched = fetch(&from.ctr, &url, 30)?;
    let fetched = fetched.map_err(|e| format!("the HTTP server at {to}: {e}"))?;
    assert!(
        fetched == data,
        "{} bytes fetched, not the same 8 MiB",
        fetched.len()
    );
    Ok(())
}
