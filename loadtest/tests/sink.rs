//! The sink over real loopback sockets: a conforming session, every failure mode of
//! a profile, every bad-input case, STARTTLS with rustls, BDAT.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use volley::deliver::runtime::Driver;
use volley_load::integrity::{Digest, HEADER};
use volley_load::profile::Profile;
use volley_load::sink::{Sink, SinkOptions};

fn start(behaviour: &str, size_max: usize) -> Sink {
    start_with(behaviour, size_max, Driver::Auto)
}

fn start_with(behaviour: &str, size_max: usize, driver: Driver) -> Sink {
    let toml = format!(
        "[sink]\nsize_max = {size_max}\n\n[[provider]]\nname = \"p\"\nlisten = [\"127.0.0.1:0\"]\ndomains = [\"p.test\"]\nmx_host = \"mx.p.test\"\n[provider.behaviour]\n{behaviour}\n"
    );
    let profile = Profile::parse(&toml).unwrap();
    Sink::start(SinkOptions {
        profile,
        threads: 2,
        driver,
        keep: None,
        tls_files: None,
    })
    .unwrap()
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> (Client, String) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = c.reply();
        (c, greeting)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    /// One whole reply, lines joined with "\n"; empty when the server closed.
    fn reply(&mut self) -> String {
        let mut all = Vec::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return all.join("\n");
            }
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            all.push(line);
            if last {
                return all.join("\n");
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }

    fn hello(addr: SocketAddr) -> Client {
        let (mut c, g) = Client::connect(addr);
        assert!(g.starts_with("220 "), "{g}");
        assert!(c.cmd("EHLO client.test").starts_with("250-"));
        c
    }
}

fn message(id: &str, body: &str) -> String {
    let d = Digest::of(body.as_bytes());
    format!(
        "Message-ID: <{id}>\r\n{HEADER}: {}\r\nSubject: t\r\n\r\n{body}",
        d.header_value()
    )
}

fn addr(s: &Sink) -> SocketAddr {
    s.addrs[0][0]
}

#[test]
fn conforming_session_counts_integrity_and_duplicates() {
    let sink = start("", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    let ehlo = c.cmd("EHLO client.test");
    for cap in [
        "PIPELINING",
        "SIZE 1048576",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "STARTTLS",
        "CHUNKING",
    ] {
        assert!(ehlo.contains(cap), "{cap} missing from {ehlo}");
    }
    let send = |c: &mut Client, content: &str| {
        assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<a@p.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("{content}\r\n.\r\n").as_bytes());
        c.reply()
    };
    // Dot-stuffed line: the sink must un-stuff it before checking the digest.
    let body = "Hello\r\n.dot line\r\n";
    let stuffed = message("1@x", body).replace("\r\n.dot", "\r\n..dot");
    assert!(send(&mut c, stuffed.trim_end()).starts_with("250"));
    assert!(
        send(&mut c, stuffed.trim_end()).starts_with("250"),
        "a duplicate is still accepted"
    );
    let tampered = stuffed.replace("1@x", "2@x").replace("Hello", "Hellp");
    assert!(send(&mut c, &tampered).starts_with("250"));
    assert!(c.cmd("QUIT").starts_with("221"));
    let s = sink.summary();
    assert_eq!(s.counts.messages_accepted, 3);
    assert_eq!(s.counts.rcpts_accepted, 2);
    assert_eq!(s.counts.duplicates, 1);
    assert_eq!(s.counts.corrupt, 1);
    assert_eq!(s.per_domain["p.test"].accepted, 2);
    assert_eq!(s.rcpts_terminal, 2);
}

#[test]
fn pipelined_group_gets_replies_in_order() {
    let sink = start("", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    c.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@p.test>\r\nRCPT TO:<permfail@p.test>\r\nRCPT TO:<b@p.test>\r\nDATA\r\n");
    let replies: Vec<String> = (0..5).map(|_| c.reply()).collect();
    assert!(replies[0].starts_with("250"));
    assert!(replies[1].starts_with("250"));
    assert!(replies[2].starts_with("550 5.1.1"), "{}", replies[2]);
    assert!(replies[3].starts_with("250"));
    assert!(replies[4].starts_with("354"));
    c.send(format!("{}\r\n.\r\n", message("p@x", "hi\r\n")).as_bytes());
    assert!(c.reply().starts_with("250"));
    assert_eq!(sink.summary().counts.rcpts_accepted, 2);
}

#[test]
fn bdat_chunks_and_mismatches() {
    let sink = start("", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    let msg = message("b@x", "chunked\r\n");
    let (a, b) = msg.split_at(20);
    c.send(
        format!(
            "MAIL FROM:<s@x.test>\r\nRCPT TO:<a@p.test>\r\nBDAT {}\r\n{a}",
            a.len()
        )
        .as_bytes(),
    );
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"), "first chunk");
    c.send(format!("BDAT {} LAST\r\n{b}", b.len()).as_bytes());
    assert!(c.reply().starts_with("250"), "last chunk");
    assert_eq!(sink.summary().counts.corrupt, 0);
    assert_eq!(sink.summary().counts.rcpts_accepted, 1);
    // BDAT without a transaction: refused, but the chunk is still consumed.
    c.send(b"BDAT 5 LAST\r\nhello");
    assert!(c.reply().starts_with("503"));
    assert!(c.cmd("NOOP").starts_with("250"), "stream still in sync");
    // A chunk longer than announced: the excess is read as a command.
    c.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@p.test>\r\nBDAT 3 LAST\r\nabcXYZ\r\n");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(
        c.reply().starts_with("502"),
        "abc was the chunk, XYZ is no command"
    );
    // DATA after BDAT in one transaction is out of order.
    c.send(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<a@p.test>\r\nBDAT 3\r\nabcDATA\r\n");
    for _ in 0..3 {
        assert!(c.reply().starts_with("250"));
    }
    assert!(c.reply().starts_with("503"));
    // A size that is not a number cannot be resynchronised: the sink says so and closes.
    assert!(c.cmd("BDAT x").starts_with("501"));
    assert!(c.closed());
}

#[test]
fn bad_input_gets_smtp_errors_not_crashes() {
    let sink = start("", 4096);
    let mut c = Client::hello(addr(&sink));
    assert!(
        c.cmd("RCPT TO:<a@p.test>").starts_with("503"),
        "RCPT before MAIL"
    );
    assert!(c.cmd("DATA").starts_with("503"), "DATA before MAIL");
    assert!(c.cmd("FROB").starts_with("502"));
    assert!(c.cmd("MAIL TO:<x>").starts_with("501"));
    c.send(b"NOOP\n");
    assert!(c.reply().starts_with("500 5.5.2 Bare LF"));
    c.send(&[b'A'; 3000]);
    c.send(b"\r\n");
    assert!(c.reply().starts_with("500 5.5.2 Line too long"));
    assert!(
        c.cmd("NOOP").starts_with("250"),
        "in sync after the long line"
    );
    assert!(c.cmd("MAIL FROM:<s@x.test> SIZE=999999").starts_with("552"));
    assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
    assert!(
        c.cmd("MAIL FROM:<s@x.test>").starts_with("503"),
        "nested MAIL"
    );
    assert!(c.cmd("DATA").starts_with("554"), "no recipients");
    assert!(c.cmd("RCPT TO:<a@p.test>").starts_with("250"));
    // Smuggling: "\n.\r\n" must not end the data, and the smuggled MAIL is content.
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@p.test>\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("550 5.6.11"), "{r}");
    assert!(
        c.cmd("NOOP").starts_with("250"),
        "exactly one reply for the whole message"
    );
    // A text line over 1000 octets, then an oversize message.
    let r = c.cmd("MAIL FROM:<s@x.test>");
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("RCPT TO:<a@p.test>");
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(&[b'x'; 1500]);
    c.send(b"\r\n.\r\n");
    assert!(c.reply().starts_with("500 5.5.6"));
    assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<a@p.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    for _ in 0..100 {
        c.send(&[b'y'; 98]);
        c.send(b"\r\n");
    }
    c.send(b".\r\n");
    assert!(c.reply().starts_with("552"));
    assert_eq!(sink.summary().counts.messages_accepted, 0);
    assert!(c.cmd("QUIT").starts_with("221"));
}

#[test]
fn failure_modes_from_the_profile() {
    let sink = start(
        "rcpt_permfail = 1.0\nrcpt_permfail_replies = [\"550 5.1.1 <{rcpt}>: no such user\"]",
        1 << 20,
    );
    let mut c = Client::hello(addr(&sink));
    assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
    assert_eq!(
        c.cmd("RCPT TO:<z@p.test>"),
        "550 5.1.1 <z@p.test>: no such user"
    );
    assert_eq!(sink.summary().counts.rcpt_permfail, 1);
    assert_eq!(sink.summary().rcpts_terminal, 1);

    let sink = start(
        "data_tempfail = 1.0\ndata_tempfail_replies = [\"421 4.7.28 rate limited\"]",
        1 << 20,
    );
    let mut c = Client::hello(addr(&sink));
    c.send(
        format!(
            "MAIL FROM:<s@x.test>\r\nRCPT TO:<a@p.test>\r\nBDAT {}\r\n",
            5
        )
        .as_bytes(),
    );
    c.send(b"hello");
    c.reply();
    c.reply();
    c.reply();
    assert_eq!(c.cmd("BDAT 0 LAST"), "421 4.7.28 rate limited");
    assert!(c.closed(), "421 closes the connection");

    let sink = start("rcpt_tempfail = 1.0", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    c.cmd("MAIL FROM:<s@x.test>");
    assert!(c.cmd("RCPT TO:<a@p.test>").starts_with("450 4.2.1"));

    // tempfail@ / permfail@ fail always, whatever the rates.
    let sink = start("", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    c.cmd("MAIL FROM:<s@x.test>");
    assert!(c.cmd("RCPT TO:<tempfail.1@p.test>").starts_with('4'));
    assert!(c.cmd("RCPT TO:<permfail.1@p.test>").starts_with('5'));
}

#[test]
fn connection_cap_rate_limit_disconnect_and_greylisting() {
    let sink = start("max_conns_per_ip = 1", 1 << 20);
    let _first = Client::hello(addr(&sink));
    let (mut second, g) = Client::connect(addr(&sink));
    assert!(g.starts_with("421 4.7.0"), "{g}");
    assert!(second.closed());
    assert_eq!(sink.summary().counts.conn_cap_421, 1);
    assert_eq!(
        sink.summary().per_provider["p"].connections_max_concurrent,
        2
    );

    let sink = start(
        "rate_per_s_per_ip = 2\nrate_reply = \"421 4.7.0 [TSS04] deferred\"",
        1 << 20,
    );
    let mut c = Client::hello(addr(&sink));
    assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
    c.cmd("RSET");
    assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
    c.cmd("RSET");
    assert_eq!(c.cmd("MAIL FROM:<s@x.test>"), "421 4.7.0 [TSS04] deferred");
    assert!(c.closed());

    let sink = start("disconnect_in_data = 1.0", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    c.cmd("MAIL FROM:<s@x.test>");
    c.cmd("RCPT TO:<a@p.test>");
    c.send(b"DATA\r\n");
    assert!(c.closed(), "dropped without a reply");
    assert_eq!(sink.summary().counts.disconnects_in_data, 1);

    let sink = start("greylist_s = 1", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    c.cmd("MAIL FROM:<s@x.test>");
    assert!(c.cmd("RCPT TO:<a@p.test>").starts_with("451 4.7.1"));
    assert!(
        c.cmd("RCPT TO:<a@p.test>").starts_with("451 4.7.1"),
        "still within the delay"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        c.cmd("RCPT TO:<a@p.test>").starts_with("250"),
        "accepted after the delay"
    );
}

#[test]
fn latency_is_applied() {
    let sink = start("latency_ms = { mail = [150, 150] }", 1 << 20);
    let mut c = Client::hello(addr(&sink));
    let t = Instant::now();
    assert!(c.cmd("MAIL FROM:<s@x.test>").starts_with("250"));
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[test]
fn epoll_driver_serves_too() {
    let sink = start_with("", 1 << 20, Driver::Epoll);
    let mut c = Client::hello(addr(&sink));
    assert!(c.cmd("NOOP").starts_with("250"));
}

#[derive(Debug)]
struct AcceptAnyCert;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn starttls_with_rustls() {
    let sink = start("", 1 << 20);
    let (mut c, _) = Client::connect(addr(&sink));
    assert!(c.cmd("EHLO client.test").contains("STARTTLS"));
    // Pipelined bytes after STARTTLS must be discarded, not run after the handshake.
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n");
    assert!(c.reply().starts_with("220"));
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AcceptAnyCert))
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "sink.volley.test".try_into().unwrap())
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, c.w);
    let read_reply = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
                      cmd: &str| {
        tls.write_all(cmd.as_bytes()).unwrap();
        let mut out = String::new();
        let mut b = [0u8; 4096];
        loop {
            let n = tls.read(&mut b).unwrap();
            out.push_str(std::str::from_utf8(&b[..n]).unwrap());
            if out.ends_with("\r\n")
                && out
                    .lines()
                    .last()
                    .is_some_and(|l| l.as_bytes().get(3) == Some(&b' '))
            {
                return out;
            }
        }
    };
    let ehlo = read_reply(&mut tls, "EHLO client.test\r\n");
    assert!(!ehlo.contains("STARTTLS"), "not offered twice");
    assert!(
        read_reply(&mut tls, "MAIL FROM:<s@x.test>\r\n").starts_with("250"),
        "no nested MAIL: the injected one was dropped"
    );
    assert!(read_reply(&mut tls, "RCPT TO:<a@p.test>\r\n").starts_with("250"));
    assert!(read_reply(&mut tls, "DATA\r\n").starts_with("354"));
    assert!(read_reply(
        &mut tls,
        &format!("{}\r\n.\r\n", message("t@x", "secret\r\n"))
    )
    .starts_with("250"));
    assert_eq!(sink.summary().counts.rcpts_accepted, 1);
}
