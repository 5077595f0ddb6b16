//! TLS for `bench connect` and `bench echo` (a `wss://` URL, or `--tls`): one rustls
//! client configuration per run (aws-lc-rs, TLS 1.2 and 1.3, ALPN `http/1.1`, no
//! session resumption), trusting the CA of `--ca` or, with `--insecure`, any
//! certificate. There is no system root store: a load generator points at a server
//! its user set up, whose CA they have.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    self, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::BenchError;
use super::common::CommonOptions;
use super::target::Target;

/// What a run needs to open TLS connections to its target: the connector, whose
/// configuration is built once and shared by every connection, and the server name.
#[derive(Clone)]
pub(crate) struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The TLS settings of a run against `target`: `None` when it speaks plain TCP
    /// (a `ws://` URL without `--tls`; `--ca` and `--insecure` are then unused, so
    /// that one command line can `--compare` a `wss://` and a `ws://` server).
    pub(crate) fn for_run(
        target: &Target,
        options: &CommonOptions,
    ) -> Result<Option<Arc<Self>>, BenchError> {
        if !(target.tls || options.tls) {
            return Ok(None);
        }
        let config = client_config(target, options)?;
        let server_name = ServerName::try_from(target.server_name.clone()).map_err(|_| {
            BenchError::Url(format!(
                "{target}: {:?} is not a valid TLS server name",
                target.server_name
            ))
        })?;
        Ok(Some(Arc::new(Self {
            connector: TlsConnector::from(config),
            server_name,
        })))
    }
}

/// The client configuration: the provider's safe defaults, the verifier `--ca` or
/// `--insecure` asks for, ALPN `http/1.1` (what a WebSocket upgrade is), and session
/// resumption off, so that every handshake is a full one.
fn client_config(
    target: &Target,
    options: &CommonOptions,
) -> Result<Arc<ClientConfig>, BenchError> {
    let provider = Arc::new(crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BenchError::Options(format!("TLS: {e}")))?;
    let mut config = if options.insecure {
        let verifier = AcceptAnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth()
    } else if let Some(path) = &options.ca {
        builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth()
    } else {
        return Err(BenchError::Options(format!(
            "{target} speaks TLS: pass --ca FILE (a PEM file of the CA to trust) or \
             --insecure (accept any certificate); the bench has no system root store"
        )));
    };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificates of the PEM file `path`, as the only trusted roots.
fn load_roots(path: &Path) -> Result<RootCertStore, BenchError> {
    let bad = |why: String| BenchError::Options(format!("--ca {}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("a certificate that cannot be a root: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// `--insecure`: any certificate is accepted, whoever it names and whoever signed
/// it, but the handshake's signatures are still verified with the provider's
/// algorithms, so the server must hold the key of the certificate it sent.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(tls: bool, ca: Option<&str>, insecure: bool) -> CommonOptions {
        CommonOptions {
            tls,
            ca: ca.map(Into::into),
            insecure,
            ..CommonOptions::default()
        }
    }

    #[test]
    fn plain_urls_need_no_tls_settings() {
        let target = Target::resolve("ws://127.0.0.1:9001/").unwrap();
        assert!(
            Tls::for_run(&target, &options(false, None, false))
                .unwrap()
                .is_none()
        );
        assert!(
            Tls::for_run(&target, &options(false, Some("/nonexistent"), false))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn tls_needs_ca_or_insecure() {
        for (url, tls) in [
            ("wss://127.0.0.1:9001/", false),
            ("ws://127.0.0.1:9001/", true),
        ] {
            let target = Target::resolve(url).unwrap();
            let err = Tls::for_run(&target, &options(tls, None, false)).unwrap_err();
            assert!(err.to_string().contains("--ca FILE"), "{err}");
            assert!(err.to_string().contains("--insecure"), "{err}");
            let tls = Tls::for_run(&target, &options(tls, None, true)).unwrap();
            assert!(tls.is_some());
        }
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let target = Target::resolve("wss://localhost:9001/").unwrap();
        let err =
            Tls::for_run(&target, &options(false, Some("/nonexistent.pem"), false)).unwrap_err();
        assert!(
            err.to_string()
                .contains("--ca /nonexistent.pem: cannot read"),
            "{err}"
        );
        let empty =
            std::env::temp_dir().join(format!("ringsocket-bench-ca-{}.pem", std::process::id()));
        std::fs::write(&empty, "hello").unwrap();
        let err = Tls::for_run(&target, &options(false, empty.to_str(), false)).unwrap_err();
        let _ = std::fs::remove_file(&empty);
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    #[test]
    fn ca_and_insecure_exclude_each_other() {
        assert!(options(true, Some("ca.pem"), true).validate().is_err());
        assert!(options(true, Some("ca.pem"), false).validate().is_ok());
    }
}
