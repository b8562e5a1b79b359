//! TLS for the bench's connections (`--tls`, `--ca`, or an `https://` URL): a server that faces
//! browsers directly pays for TLS on every subscriber, so the bench must be able to make it pay.
//! One client configuration per protocol that ALPN may pick, made once per run.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

/// A connection to the server, with or without TLS.
pub type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// Where the system keeps the certificate authorities it trusts (Debian and its kin), for a
/// run without `--ca`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How the bench opens TLS to one server: which certificates it trusts, which name it expects.
pub struct Tls {
    /// ALPN `http/1.1`.
    http1: TlsConnector,
    /// ALPN `h2`.
    http2: TlsConnector,
    name: ServerName<'static>,
}

impl Tls {
    /// Trusts the certificates in the PEM file `ca` (a CA, or the server's self-signed
    /// certificate itself), or the system's authorities without one; expects the server to
    /// prove it is `host` (a name or an IP address, as in the URL).
    pub fn new(ca: Option<&Path>, host: &str) -> anyhow::Result<Tls> {
        let file = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(file).with_context(|| match ca {
            Some(_) => format!("cannot read certificates from {}", file.display()),
            None => format!(
                "cannot read the system's certificate authorities from {}: give --ca with the \
                 server's certificate or its CA",
                file.display()
            ),
        })?;
        for cert in certs {
            let cert = cert.with_context(|| format!("{} is not PEM", file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a certificate in {} is unusable", file.display()))?;
        }
        if roots.is_empty() {
            anyhow::bail!(
                "{} holds no certificate: give --ca with the server's certificate or its CA",
                file.display()
            );
        }
        let config = |alpn: &[u8]| -> anyhow::Result<TlsConnector> {
            // The provider named, not installed process-wide: the hub in the same binary makes
            // its own choice the same way.
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsConnector::from(Arc::new(config)))
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| anyhow::anyhow!("{host:?} is not a name TLS can check a server for"))?;
        Ok(Tls {
            http1: config(b"http/1.1")?,
            http2: config(b"h2")?,
            name,
        })
    }

    /// The handshake on `tcp`, offering HTTP/2 or HTTP/1.1 (and only that one) by ALPN.
    pub async fn connect(&self, tcp: TcpStream, http2: bool) -> std::io::Result<Stream> {
        let connector = if http2 { &self.http2 } else { &self.http1 };
        let tls = connector.connect(self.name.clone(), tcp).await?;
        Ok(Either::Right(tls))
    }
}

/// The host of an authority (`host:port`, `[v6]:port`), as TLS checks it.
pub fn host_of(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_an_authority() {
        assert_eq!(host_of("127.0.0.1:8443"), "127.0.0.1");
        assert_eq!(host_of("localhost"), "localhost");
        assert_eq!(host_of("[::1]:443"), "::1");
    }
}
