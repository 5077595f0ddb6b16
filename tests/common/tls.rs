//! A test CA made with `rcgen` (nothing with a key is checked in), the server's
//! certificate files in a temporary directory, and rustls clients that trust the CA.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    date_time_ymd,
};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::CertificateDer};

/// A certificate authority for one test, and a directory for its files.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: PathBuf,
}

/// A server certificate signed by a [`TestCa`], as PEM files.
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ringsocket test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "ringsocket-tls-{name}-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Self { issuer, dir }
    }

    /// The CA certificate's PEM file (for `curl --cacert`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `localhost` and 127.0.0.1 named `cn`, written as
    /// `{file}.pem` and `{file}.key`.
    pub fn server_cert(&self, file: &str, cn: &str) -> ServerCert {
        self.server_cert_valid(file, cn, None)
    }

    /// As [`TestCa::server_cert`], valid from `from` to `until` (years) when given.
    pub fn server_cert_valid(&self, file: &str, cn: &str, years: Option<(i32, i32)>) -> ServerCert {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some((from, until)) = years {
            params.not_before = date_time_ymd(from, 1, 1);
            params.not_after = date_time_ymd(until, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ServerCert {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
        }
    }

    /// A rustls client configuration that trusts this CA (and nothing else).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    nanos ^ (NEXT.fetch_add(1, Ordering::Relaxed) << 32)
}

/// A wss:// WebSocket to `addr{path}` through tokio-tungstenite over rustls, trusting
/// `config`'s roots.
pub async fn wss_connect(
    addr: std::net::SocketAddr,
    path: &str,
    config: Arc<ClientConfig>,
) -> super::Client {
    let url = format!("wss://localhost:{}{path}", addr.port());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        super::PATIENCE,
        tokio_tungstenite::client_async_tls_with_config(
            url,
            tcp,
            None,
            Some(tokio_tungstenite::Connector::Rustls(config)),
        ),
    )
    .await
    .expect("wss connect timed out")
    .expect("wss handshake failed")
    .0
}

/// A TLS connection to `addr` as `localhost`, after its handshake.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Sends a raw HTTP request over TLS and returns the whole response (the request
/// should say `Connection: close`).
pub async fn https_exchange(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    request: &[u8],
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tls_connect(addr, config).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    // A server that closes without close_notify ends the read with an error after the
    // response: what was read is what counts.
    let _ = tokio::time::timeout(super::PATIENCE, stream.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
