//! The audit's HTTP(S) client: one request on a fresh connection, bounded in time, as an
//! anonymous client would send it. TLS accepts any server certificate (`curl -k`): the audit
//! asks what a server gives to whoever connects, not whether the server is who it says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::findings::HttpOutcome;

/// Most of a body the audit keeps.
const MAX_ANSWER: usize = 64 * 1024;

/// Accepts every server certificate, checks the handshake's signatures.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub addr: SocketAddr,
    pub tls: bool,
    pub method: &'static str,
    pub path: String,
    pub body: Option<String>,
}

impl Request {
    pub fn get(addr: SocketAddr, tls: bool, path: &str) -> Self {
        Self {
            addr,
            tls,
            method: "GET",
            path: path.into(),
            body: None,
        }
    }
}

/// Sends `req` (HTTP/1.0, so the server closes when done) and reads the answer, every step
/// within `connect` (to connect) and `total` (the whole exchange).
pub fn send(req: &Request, connect: Duration, total: Duration) -> HttpOutcome {
    match exchange(req, connect, total) {
        Ok(raw) => parse_answer(&raw),
        Err(e) => HttpOutcome::Failed(io_words(&e, connect)),
    }
}

fn io_words(e: &std::io::Error, connect: Duration) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => {
            format!(
                "no answer in time (connect timeout {} ms)",
                connect.as_millis()
            )
        }
        _ => crate::globals::strip_os_error(&e.to_string()),
    }
}

fn exchange(req: &Request, connect: Duration, total: Duration) -> std::io::Result<Vec<u8>> {
    let deadline = Instant::now() + total;
    let tcp = TcpStream::connect_timeout(&req.addr, connect)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    tcp.set_read_timeout(Some(left()))?;
    tcp.set_write_timeout(Some(left()))?;
    let host = match req.addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let mut head = format!(
        "{} {} HTTP/1.0\r\nHost: {host}:{}\r\nUser-Agent: malla-audit\r\nAccept: application/json, */*\r\n",
        req.method,
        req.path,
        req.addr.port()
    );
    if let Some(b) = &req.body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    if let Some(b) = &req.body {
        head.push_str(b);
    }
    let mut raw = Vec::new();
    if req.tls {
        let config = tls_config().map_err(std::io::Error::other)?;
        let name = ServerName::IpAddress(req.addr.ip().into());
        let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(head.as_bytes())?;
        read_bounded(&mut s, &mut raw, &left)?;
    } else {
        let mut s = tcp;
        s.write_all(head.as_bytes())?;
        read_bounded(&mut s, &mut raw, &left)?;
    }
    Ok(raw)
}

/// Reads until the end, [`MAX_ANSWER`] bytes or the deadline; what came before an abrupt end
/// (a peer closing TLS without close_notify) counts.
fn read_bounded(
    s: &mut dyn ReadTimeout,
    raw: &mut Vec<u8>,
    left: &dyn Fn() -> Duration,
) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    loop {
        s.set_timeout(left())?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() >= MAX_ANSWER {
                    return Ok(());
                }
            }
            Err(e)
                if !raw.is_empty()
                    && (e.kind() == std::io::ErrorKind::UnexpectedEof || raw_is_complete(raw)) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
    }
}

/// The headers arrived and as many body bytes as Content-Length said.
fn raw_is_complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

/// A stream whose read timeout can be set (TCP, or TLS over TCP).
trait ReadTimeout: Read {
    fn set_timeout(&mut self, t: Duration) -> std::io::Result<()>;
}

impl ReadTimeout for TcpStream {
    fn set_timeout(&mut self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
}

impl ReadTimeout for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_timeout(&mut self, t: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(t))
    }
}

/// Status and body of a raw HTTP answer; anything else is "not HTTP".
pub fn parse_answer(raw: &[u8]) -> HttpOutcome {
    if raw.is_empty() {
        return HttpOutcome::Failed("empty answer".into());
    }
    let text = String::from_utf8_lossy(raw);
    let mut parts = text.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    };
    let Some(status) = status else {
        return HttpOutcome::Failed("answer is not HTTP".into());
    };
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    HttpOutcome::Answered { status, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_or_named_not_http() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nForbidden"),
            HttpOutcome::Answered {
                status: 403,
                body: "Forbidden".into()
            }
        );
        assert_eq!(
            parse_answer(b"SSH-2.0-OpenSSH_9.2\r\n"),
            HttpOutcome::Failed("answer is not HTTP".into())
        );
        assert_eq!(
            parse_answer(b""),
            HttpOutcome::Failed("empty answer".into())
        );
        assert!(raw_is_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ));
        assert!(!raw_is_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok"
        ));
    }

    #[test]
    fn a_plain_server_answers_and_a_closed_port_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /version HTTP/1.0"));
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\n{\"etcdserver\":\"3.4.23\"}")
                .unwrap();
        });
        let t = Duration::from_millis(300);
        let got = send(
            &Request::get(addr, false, "/version"),
            t,
            Duration::from_secs(2),
        );
        server.join().unwrap();
        assert_eq!(
            got,
            HttpOutcome::Answered {
                status: 200,
                body: "{\"etcdserver\":\"3.4.23\"}".into()
            }
        );
        // Nothing listens there any more.
        assert_eq!(
            send(&Request::get(addr, false, "/"), t, Duration::from_secs(2)),
            HttpOutcome::Failed("connection refused".into())
        );
    }

    #[test]
    fn tls_to_a_plain_server_fails_within_the_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Accepts and says nothing: the handshake waits for the deadline.
        let _server = std::thread::spawn(move || {
            let conn = l.accept();
            std::thread::sleep(Duration::from_secs(2));
            drop(conn);
        });
        let start = Instant::now();
        let got = send(
            &Request::get(addr, true, "/pods"),
            Duration::from_millis(300),
            Duration::from_millis(500),
        );
        assert!(matches!(got, HttpOutcome::Failed(_)), "{got:?}");
        assert!(start.elapsed() < Duration::from_millis(1500));
    }
}
