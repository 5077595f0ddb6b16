//! Writes a throwaway test CA and a server certificate for `localhost` and 127.0.0.1,
//! made with `rcgen` at run time (no key is ever checked in): `ca.pem`, `cert.pem`,
//! `key.pem` in the directory given. For trying TLS by hand and for the conformance
//! run over TLS (`tests/conformance/run.sh` with `CONFORMANCE_TLS=1`).
//!
//! ```text
//! cargo run --example test_cert -- /tmp/certs
//! cargo run --release -- serve --tls-cert /tmp/certs/cert.pem --tls-key /tmp/certs/key.pem
//! curl --cacert /tmp/certs/ca.pem https://localhost:9001/healthz
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: test_cert DIR");
        return ExitCode::FAILURE;
    };
    match write(&dir) {
        Ok(()) => {
            println!("wrote {0}/ca.pem, {0}/cert.pem, {0}/key.pem", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("test_cert: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ringsocket throwaway test CA");
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), issuer.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(())
}
