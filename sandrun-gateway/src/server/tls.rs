//! TLS configuration: rustls only, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
//!
//! Either a certificate chain and key from PEM files, or (`--dev`) a self-signed certificate for
//! `localhost` generated in memory (its key never written to disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

/// Largest PEM file read (a certificate chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Failure to set up TLS. (Local configuration's fault.)
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    NoCertificate {
        path: PathBuf,
    },
    NoKey {
        path: PathBuf,
    },
    Generate(String),
    Config(rustls::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Read { path, source } => write!(f, "reading {}: {source}", path.display()),
            TlsError::NoCertificate { path } => {
                write!(f, "no PEM certificate found in {}", path.display())
            }
            TlsError::NoKey { path } => write!(f, "no PEM private key found in {}", path.display()),
            TlsError::Generate(e) => write!(f, "generating the development certificate: {e}"),
            TlsError::Config(e) => write!(f, "building the TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// A generated development certificate: the server config, plus the certificate for clients.
pub struct DevCert {
    pub config: Arc<ServerConfig>,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
}

/// Loads a certificate chain and private key from PEM files.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = read_pem(cert_path)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key_pem = read_pem(key_path)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key_path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: key_path.to_owned(),
        })?;
    build(certs, key)
}

/// Generates a self-signed certificate for `localhost`, `127.0.0.1` and `::1`, in memory. Like an
/// installation's certificate it has a unique subject and a subject key identifier, so a client
/// that trusts several development gateways at once (a pool coordinator with two workers) can
/// tell their certificates apart.
pub fn dangerous_dev_cert() -> Result<DevCert, TlsError> {
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let (cert, key_pair) = unique_self_signed(&names, "dev")?;
    let cert_der = cert.der().clone();
    let cert_pem = cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let config = build(vec![cert_der.clone()], key)?;
    Ok(DevCert {
        config,
        cert_der,
        cert_pem,
    })
}

/// A self-signed certificate for an installation (`sandrun-gateway cert`): the names given, a
/// subject that is unique to this certificate (host and a random serial, so that two installations
/// never present the same issuer and subject to a client that pinned one), a subject key
/// identifier, and a random serial number. Returns (certificate PEM, private key PEM).
pub fn self_signed_pem(names: &[String], host: &str) -> Result<(String, String), TlsError> {
    let (cert, key) = unique_self_signed(names, host)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The certificate of [`self_signed_pem`] and [`dangerous_dev_cert`]: subject
/// `CN=sandrun HOST SERIAL`, a random positive serial, a SHA-256 subject key identifier, a leaf
/// for server authentication.
fn unique_self_signed(
    names: &[String],
    host: &str,
) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
    use rand::RngCore as _;
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(gen)?;
    let mut serial = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f; // a positive INTEGER
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        format!("sandrun {host} {}", hex::encode(&serial[..8])),
    );
    dn.push(rcgen::DnType::OrganizationName, "sandrun self-signed");
    params.distinguished_name = dn;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.key_identifier_method = rcgen::KeyIdMethod::Sha256;
    // rcgen writes the subject key identifier only with an explicit CA choice: a leaf.
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().map_err(gen)?;
    let cert = params.self_signed(&key).map_err(gen)?;
    Ok((cert, key))
}

fn build(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_two_installation_certs_then_each_loads_and_their_subjects_differ() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut ders = Vec::new();
        for i in 0..2 {
            let (cert, key) = self_signed_pem(&names, "host").unwrap();
            let (c, k) = (
                dir.path().join(format!("c{i}")),
                dir.path().join(format!("k{i}")),
            );
            std::fs::write(&c, &cert).unwrap();
            std::fs::write(&k, &key).unwrap();
            load(&c, &k).unwrap();
            ders.push(
                rustls_pemfile::certs(&mut cert.as_bytes())
                    .next()
                    .unwrap()
                    .unwrap(),
            );
        }
        // The subject (and issuer) sits in the DER; the common name carries the random serial.
        let cn = |der: &[u8]| {
            let at = der.windows(8).position(|w| w == b"sandrun ").unwrap();
            der[at..at + 30].to_vec()
        };
        assert_ne!(cn(&ders[0]), cn(&ders[1]));
        // The subject key identifier extension (OID 2.5.29.14) is present.
        assert!(ders[0]
            .windows(5)
            .any(|w| w == [0x06, 0x03, 0x55, 0x1d, 0x0e]));
    }

    #[test]
    fn given_two_dev_certs_then_their_subjects_differ_and_each_has_a_key_identifier() {
        let ders =
            [dangerous_dev_cert().unwrap(), dangerous_dev_cert().unwrap()].map(|d| d.cert_der);
        let cn = |der: &[u8]| {
            let at = der.windows(12).position(|w| w == b"sandrun dev ").unwrap();
            der[at..at + 28].to_vec()
        };
        assert_ne!(cn(&ders[0]), cn(&ders[1]));
        for der in &ders {
            assert!(der.windows(5).any(|w| w == [0x06, 0x03, 0x55, 0x1d, 0x0e]));
        }
    }

    #[test]
    fn given_dev_cert_then_it_loads_back_from_pem_files() {
        let dev = dangerous_dev_cert().unwrap();
        assert!(dev.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, &dev.cert_pem).unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        assert!(matches!(load(&cert, &key), Err(TlsError::NoKey { .. })));
    }

    #[test]
    fn given_missing_file_then_error_names_the_path() {
        let err = load(Path::new("/nonexistent/cert.pem"), Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"));
    }
}
