//! Minimal HTTPS client for the coordinator API, authenticating with an operator
//! certificate. Used by the `fleetmesh` CLI, the integration tests and the benchmarks.

use std::sync::Arc;
use std::time::Duration;

use fleetmesh_protocol::tls::TlsIdentity;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio_rustls::TlsConnector;

use crate::answers::ApiErrorBody;

/// Default API port.
pub const DEFAULT_API_PORT: u16 = 7401;
/// Whole-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// API client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid API address {0:?}: expected https://HOST[:PORT]")]
    BadUrl(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot reach the coordinator API at {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("request to {addr} timed out")]
    Timeout { addr: String },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer: {0}")]
    Decode(String),
}

/// A configured API client.
#[derive(Clone)]
pub struct ApiClient {
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiClient(https://{}:{})", self.host, self.port)
    }
}

/// Split `https://HOST[:PORT][/]` into host and port.
pub fn parse_api_url(url: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadUrl(url.to_string());
    let rest = url.strip_prefix("https://").ok_or_else(bad)?.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(bad());
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => DEFAULT_API_PORT,
            None => return Err(bad()),
        };
        return Ok((h.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().map_err(|_| bad())?)),
        None => Ok((rest.to_string(), DEFAULT_API_PORT)),
    }
}

impl ApiClient {
    pub fn new(url: &str, tls: &TlsIdentity) -> Result<Self, ClientError> {
        let (host, port) = parse_api_url(url)?;
        let cfg = tls
            .client_config(&[b"http/1.1"], false)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Self { host, port, tls: Arc::new(cfg) })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// GET `path`; returns status and body.
    pub async fn get(&self, path: &str) -> Result<(u16, Bytes), ClientError> {
        self.request("GET", path, None).await
    }

    /// Send a request; returns status and body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let addr = self.addr();
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout { addr })?
    }

    /// POST a raw body (e.g. a workflow file) and decode the JSON answer.
    pub async fn post_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let (status, body) = self.request("POST", path, Some(body)).await?;
        decode(status, &body)
    }

    /// POST a JSON body to `path` and decode the JSON answer.
    pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        let (status, body) = self.request("POST", path, Some(bytes)).await?;
        decode(status, &body)
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let addr = self.addr();
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| ClientError::Connect { addr: addr.clone(), msg: e.to_string() })?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| ClientError::BadUrl(format!("{}: {e}", self.host)))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Connect { addr: addr.clone(), msg: format!("TLS: {e}") })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let mut req =
            Request::builder().method(method).uri(path).header(hyper::header::HOST, addr.as_str());
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    }

    /// GET `path` and decode JSON; non-2xx answers become [`ClientError::Api`].
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.get(path).await?;
        decode(status, &body)
    }

    /// GET `path` as text (e.g. `/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (status, body) = self.get(path).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if !(200..300).contains(&status) {
            return Err(ClientError::Api { status, message: text });
        }
        Ok(text)
    }
}

/// `s` percent-encoded for one path segment or query value: everything but the
/// unreserved characters (array members' ids carry `[` and `]`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<ApiErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        return Err(ClientError::Api { status, message });
    }
    serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_api_url("https://127.0.0.1:7401").unwrap(), ("127.0.0.1".into(), 7401));
        assert_eq!(
            parse_api_url("https://coord.example/").unwrap(),
            ("coord.example".into(), 7401)
        );
        assert_eq!(parse_api_url("https://[::1]:9000").unwrap(), ("::1".into(), 9000));
        assert!(parse_api_url("http://x").is_err());
        assert!(parse_api_url("https://x/y").is_err());
    }

    #[test]
    fn member_ids_are_encoded_for_paths() {
        assert_eq!(segment("wf-1a2b3c.map[17]"), "wf-1a2b3c.map%5B17%5D");
        assert_eq!(segment("a b/c?d"), "a%20b%2Fc%3Fd");
    }
}
