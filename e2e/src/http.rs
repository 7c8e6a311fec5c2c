//! Plain-HTTP GETs for tests and readiness checks (ureq, no TLS), optionally from inside a host's
//! network namespace.

use std::time::Duration;

use base64::Engine;

use crate::error::{Error, Result};
use crate::netns::Netns;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|source| Error::Json {
            what: "response body".into(),
            source,
        })
    }
}

/// Username and password for HTTP basic auth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// GET `url` with `headers`; in `netns` if given. Any HTTP status is a response, not an error.
pub fn get(url: &str, headers: &[(&str, &str)], netns: Option<&Netns>) -> Result<Response> {
    match netns {
        Some(ns) => ns.run_in(|| get_here(url, headers))?,
        None => get_here(url, headers),
    }
}

fn get_here(url: &str, headers: &[(&str, &str)]) -> Result<Response> {
    let err = |message: String| Error::Http {
        url: url.to_string(),
        message,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .max_redirects(0)
        .build()
        .into();
    let mut req = agent.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.call().map_err(|e| err(e.to_string()))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_vec()
        .map_err(|e| err(e.to_string()))?;
    Ok(Response {
        status,
        headers,
        body,
    })
}
