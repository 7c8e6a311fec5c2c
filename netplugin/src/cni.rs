//! Standard CNI plugins instead of the built-in container setup (`tug agent --cni-conf-dir`).
//!
//! The agent reads the first network configuration (`*.conf`, `*.json` or `*.conflist`, by
//! name) in the configuration directory and calls its plugins the standard way (CNI spec 1.0):
//! each plugin binary from the bin directory, `CNI_COMMAND`/`CNI_CONTAINERID`/`CNI_NETNS`/
//! `CNI_IFNAME`/`CNI_PATH` in its environment and its configuration (with `name`, `cniVersion`
//! and, for chained plugins, `prevResult`) on stdin. DEL runs the chain in reverse. The literal
//! `$TUG_NODE_SUBNET` in the file is replaced by the node's subnet, so one file serves every
//! node (e.g. as host-local's range), and `$TUG_NETWORK_DIR` by the agent's network directory.
//!
//! The ADD result is kept (`<state dir>/<id>.json`): it gives the container's address after an
//! agent restart and is the `prevResult` of DEL and CHECK.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::ipam::validate_id;
use crate::subnet::Subnet;

/// The placeholder replaced by the node's subnet.
pub const SUBNET_PLACEHOLDER: &str = "$TUG_NODE_SUBNET";
/// The placeholder replaced by the agent's network state directory (e.g. for host-local's
/// `dataDir`, so several agents on one machine do not share it).
pub const STATE_DIR_PLACEHOLDER: &str = "$TUG_NETWORK_DIR";

/// A loaded network configuration list.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    /// The file it came from.
    pub file: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration, in chain order.
    pub plugins: Vec<Map<String, Value>>,
    /// Where plugin binaries are.
    pub bin_dir: PathBuf,
    /// Where ADD results are kept.
    pub state_dir: PathBuf,
}

fn invalid(file: &Path, reason: impl Into<String>) -> Error {
    Error::Cni {
        what: format!("load the CNI configuration {}", file.display()),
        reason: reason.into(),
    }
}

impl CniNetwork {
    /// The first configuration in `conf_dir`, for a node whose subnet is `subnet`; ADD results
    /// go to `state_dir`, which `network_dir` (the placeholder's value) holds.
    pub fn load(
        conf_dir: &Path,
        bin_dir: &Path,
        network_dir: &Path,
        subnet: Subnet,
    ) -> Result<CniNetwork> {
        let state_dir = network_dir.join("cni");
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
            .map_err(Error::io("read the CNI configuration directory", conf_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "json" | "conflist")
                )
            })
            .collect();
        files.sort();
        let file = files.into_iter().next().ok_or_else(|| Error::Cni {
            what: format!("find a CNI configuration in {}", conf_dir.display()),
            reason: "no *.conf, *.json or *.conflist file there".into(),
        })?;
        let text = std::fs::read_to_string(&file).map_err(Error::io("read", &file))?;
        let text = text
            .replace(SUBNET_PLACEHOLDER, &subnet.to_string())
            .replace(STATE_DIR_PLACEHOLDER, &network_dir.to_string_lossy());
        let value: Value =
            serde_json::from_str(&text).map_err(|e| invalid(&file, format!("not JSON: {e}")))?;
        let Value::Object(mut top) = value else {
            return Err(invalid(&file, "not a JSON object"));
        };
        let name = top
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&file, "no \"name\""))?
            .to_string();
        let cni_version = top
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("1.0.0")
            .to_string();
        let plugins = match top.remove("plugins") {
            Some(Value::Array(list)) => list
                .into_iter()
                .map(|p| match p {
                    Value::Object(m) => Ok(m),
                    _ => Err(invalid(&file, "a plugin is not a JSON object")),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => return Err(invalid(&file, "\"plugins\" is not a list")),
            None => vec![top],
        };
        if plugins.is_empty() {
            return Err(invalid(&file, "no plugins"));
        }
        for p in &plugins {
            let kind = p
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&file, "a plugin has no \"type\""))?;
            if kind.contains('/') || !bin_dir.join(kind).is_file() {
                return Err(invalid(
                    &file,
                    format!(
                        "plugin {kind:?} is not in {} (install containernetworking-plugins or \
                         pass --cni-bin-dir)",
                        bin_dir.display()
                    ),
                ));
            }
        }
        Ok(CniNetwork {
            file,
            name,
            cni_version,
            plugins,
            bin_dir: bin_dir.to_path_buf(),
            state_dir,
        })
    }

    fn result_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("{id}.json"))
    }

    /// ADD: run the chain; the container's IPv4 address from the result. On failure the chain
    /// is deleted again.
    pub fn add(&self, id: &str, netns: &Path, ifname: &str) -> Result<Ipv4Addr> {
        validate_id(id)?;
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            match self.call("ADD", plugin, id, netns, ifname, prev.as_ref()) {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    let _ = self.del_chain(id, netns, ifname, prev.as_ref());
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        let address = first_ipv4(&result).ok_or_else(|| Error::Cni {
            what: format!("add container {id} to network {}", self.name),
            reason: format!("the result names no IPv4 address: {result}"),
        });
        let address = match address {
            Ok(a) => a,
            Err(e) => {
                let _ = self.del_chain(id, netns, ifname, Some(&result));
                return Err(e);
            }
        };
        std::fs::create_dir_all(&self.state_dir).map_err(Error::io("create", &self.state_dir))?;
        let path = self.result_path(id);
        std::fs::write(&path, result.to_string()).map_err(Error::io("write", &path))?;
        Ok(address)
    }

    /// DEL: the chain in reverse, with the kept result; then the result is forgotten. Works
    /// when the namespace is gone and when called twice.
    pub fn del(&self, id: &str, netns: &Path, ifname: &str) -> Result<()> {
        validate_id(id)?;
        let path = self.result_path(id);
        let prev = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        self.del_chain(id, netns, ifname, prev.as_ref())?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path)(e)),
        }
    }

    /// CHECK: every plugin with the kept result.
    pub fn check(&self, id: &str, netns: &Path, ifname: &str) -> Result<()> {
        validate_id(id)?;
        let path = self.result_path(id);
        let prev: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| Error::Cni {
                what: format!("check container {id}"),
                reason: "it was never added".into(),
            })?;
        for plugin in &self.plugins {
            self.call("CHECK", plugin, id, netns, ifname, Some(&prev))?;
        }
        Ok(())
    }

    /// The containers with a kept ADD result.
    pub fn attached(&self) -> Vec<String> {
        std::fs::read_dir(&self.state_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(".json"))
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The address ADD gave `id`, from the kept result.
    pub fn address_of(&self, id: &str) -> Option<Ipv4Addr> {
        let bytes = std::fs::read(self.result_path(id)).ok()?;
        first_ipv4(&serde_json::from_slice(&bytes).ok()?)
    }

    fn del_chain(&self, id: &str, netns: &Path, ifname: &str, prev: Option<&Value>) -> Result<()> {
        let mut first_error = None;
        for plugin in self.plugins.iter().rev() {
            if let Err(e) = self.call("DEL", plugin, id, netns, ifname, prev) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn call(
        &self,
        command: &str,
        plugin: &Map<String, Value>,
        id: &str,
        netns: &Path,
        ifname: &str,
        prev: Option<&Value>,
    ) -> Result<Value> {
        let kind = plugin.get("type").and_then(Value::as_str).unwrap_or("");
        let mut conf = plugin.clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let what = || format!("run CNI plugin {kind} {command} for container {id}");
        let mut child = Command::new(self.bin_dir.join(kind))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", &self.bin_dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Cni {
                what: what(),
                reason: e.to_string(),
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(Value::Object(conf).to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| Error::Cni {
            what: what(),
            reason: e.to_string(),
        })?;
        let stdout: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            // The spec's error object: {"code": N, "msg": "...", "details": "..."}.
            let msg = stdout
                .get("msg")
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
            let details = stdout.get("details").and_then(Value::as_str).unwrap_or("");
            return Err(Error::Cni {
                what: what(),
                reason: if details.is_empty() {
                    msg
                } else {
                    format!("{msg} ({details})")
                },
            });
        }
        Ok(stdout)
    }
}

/// The first IPv4 address of a CNI result (`ips[].address`, "10.88.0.5/24").
fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result.get("ips")?.as_array()?.iter().find_map(|ip| {
        let address = ip.get("address")?.as_str()?;
        address.split('/').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_load_with_the_subnet_and_check_their_plugins()
    -> Result<(), Box<dyn std::error::Error>> {
        let conf = tempfile::tempdir()?;
        let bin = tempfile::tempdir()?;
        std::fs::write(bin.path().join("bridge"), "")?;
        std::fs::write(
            conf.path().join("10-tug.conflist"),
            r#"{"cniVersion":"1.0.0","name":"tug","plugins":[{"type":"bridge","ipam":{"type":"host-local","ranges":[[{"subnet":"$TUG_NODE_SUBNET"}]]}}]}"#,
        )?;
        std::fs::write(conf.path().join("README"), "not a config")?;
        let subnet: Subnet = "10.88.3.0/24".parse()?;
        let net = CniNetwork::load(conf.path(), bin.path(), conf.path(), subnet)?;
        assert_eq!((net.name.as_str(), net.plugins.len()), ("tug", 1));
        assert_eq!(
            net.plugins[0]["ipam"]["ranges"][0][0]["subnet"],
            Value::String("10.88.3.0/24".into())
        );

        std::fs::write(
            conf.path().join("00-bad.conf"),
            r#"{"cniVersion":"1.0.0","name":"x","type":"macvlan"}"#,
        )?;
        let err = CniNetwork::load(conf.path(), bin.path(), conf.path(), subnet)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("plugin \"macvlan\" is not in"), "{err}");
        Ok(())
    }

    #[test]
    fn results_give_the_first_ipv4_address() {
        let result: Value = serde_json::from_str(
            r#"{"ips":[{"address":"fd00::5/64"},{"address":"10.88.0.5/24","gateway":"10.88.0.1"}]}"#,
        )
        .unwrap_or(Value::Null);
        assert_eq!(first_ipv4(&result), Some(Ipv4Addr::new(10, 88, 0, 5)));
        assert_eq!(first_ipv4(&Value::Null), None);
    }
}
