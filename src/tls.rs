//! TLS for the HTTP and gRPC listeners (rustls): a certificate chain and key from PEM files, read again
//! on SIGHUP so a renewed certificate needs no restart. A reload that fails keeps the one in
//! use and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

fn build(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("tls cert {}: no certificate in it", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls cert and key: {e}"))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl Tls {
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let c = build(cert, key)?;
        Ok(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(c)),
        })
    }

    /// Reads the files again; on an error the configuration in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let c = build(&self.cert, &self.key)?;
        if let Ok(mut cur) = self.current.write() {
            *cur = Arc::new(c);
        }
        Ok(())
    }

    /// An acceptor with the configuration in use now (new connections only; those open keep
    /// theirs).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let c = match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        tokio_rustls::TlsAcceptor::from(c)
    }

    /// The same, offering HTTP/2 by ALPN: for gRPC, whose clients insist on it.
    pub fn acceptor_h2(&self) -> tokio_rustls::TlsAcceptor {
        let mut c = match self.current.read() {
            Ok(c) => (**c).clone(),
            Err(p) => (**p.into_inner()).clone(),
        };
        c.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(c))
    }
}
