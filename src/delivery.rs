//! The IO glue for one outbound connection: connect to the site's hosts in order,
//! then feed the sans-IO client session with the site's queued work, writing what
//! it says to write and reading what the server says, until the queue is drained,
//! the connection has carried its maximum, or the server goes away.

use crate::shard::{stage_name, Job, Shard, Site};
use crate::smtp::client::{ClientConfig, ClientSession, Event, Transaction};
use crate::smtp::reply::Reply;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Read buffer per connection: replies are small, even pipelined.
const READ_BUF_BYTES: usize = 16 * 1024;
/// How often an idle connection looks for new work in its site's queue.
const IDLE_POLL: Duration = Duration::from_millis(10);

/// A connection task for `site`; the shard spawned it and counted it in `site.conns`.
pub async fn connection(shard: Rc<Shard>, site: Rc<Site>) {
    let port = shard.cfg.smtp_port;
    let targets: Vec<(&str, SocketAddr)> = site
        .hosts
        .iter()
        .flat_map(|h| {
            h.addrs
                .iter()
                .map(move |ip| (h.name.as_str(), SocketAddr::new(*ip, port)))
        })
        .collect();
    let mut last_error = String::from("no address to connect to");
    let mut delivered_any = false;
    for (host, addr) in targets {
        let stream = match monoio::time::timeout(
            shard.cfg.connect_timeout,
            TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                last_error = format!("connect to {host} [{addr}]: {e}");
                continue;
            }
            Err(_) => {
                last_error = format!(
                    "connect to {host} [{addr}]: timed out after {:?}",
                    shard.cfg.connect_timeout
                );
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match session(&shard, &site, stream, host, addr).await {
            Ok(()) => {
                delivered_any = true;
                break;
            }
            // Refused at greeting or EHLO: the next host may take it (RFC 5321 §5.1).
            Err(why) => last_error = why,
        }
    }
    site.conns.set(site.conns.get() - 1);
    if !delivered_any && site.conns.get() == 0 {
        // Every host failed: the whole destination waits, not message by message.
        let jobs: Vec<Job> = site.queue.borrow_mut().drain(..).collect();
        let reply = Reply::new(
            451,
            Some("4.4.1"),
            &format!("no MX host of this site took a connection; last: {last_error}"),
        );
        for job in jobs {
            shard.outcome(job, &reply, "connect", None, None, None);
        }
    }
    shard.ensure_connections(&site);
}

/// Runs one SMTP session. Ok when it was established (whatever happened to the
/// messages); Err with the reason when it never got past greeting/EHLO.
async fn session(
    shard: &Rc<Shard>,
    site: &Rc<Site>,
    mut stream: TcpStream,
    host: &str,
    addr: SocketAddr,
) -> Result<(), String> {
    let cfg = &shard.cfg;
    let client_cfg = ClientConfig {
        ehlo_name: cfg.ehlo_name.clone(),
        timeouts: cfg.timeouts,
        window: cfg.window,
    };
    let mut s = ClientSession::new(client_cfg, Instant::now());
    let mut inflight: HashMap<u64, (Vec<Job>, Instant)> = HashMap::new();
    let mut established = false;
    let mut sent = 0usize;
    let mut idle_since: Option<Instant> = None;
    let mut write_error: Option<String> = None;
    let mut buf = Vec::with_capacity(READ_BUF_BYTES);
    loop {
        // Fill the window from the site's queue.
        while established && s.can_submit() && sent < cfg.max_msgs_per_conn {
            let Some(jobs) = pop_batch(shard, site) else {
                break;
            };
            let tx = build_tx(shard, &jobs);
            inflight.insert(tx.id, (jobs, Instant::now()));
            s.submit(tx, Instant::now());
            sent += 1;
        }
        if established && s.is_idle() && s.in_flight() == 0 {
            let queue_empty = site.queue.borrow().is_empty();
            let since = *idle_since.get_or_insert_with(Instant::now);
            if sent >= cfg.max_msgs_per_conn
                || shard.stop_requested()
                || (queue_empty && since.elapsed() >= cfg.idle_timeout)
            {
                s.quit(Instant::now());
            } else if queue_empty {
                monoio::time::sleep(IDLE_POLL).await;
                continue;
            } else {
                continue;
            }
        } else {
            idle_since = None;
        }
        let out = s.take_output();
        if !out.is_empty() && write_error.is_none() {
            let (res, _) = stream.write_all(out).await;
            // The server may have closed after replying (a 421): read those replies
            // before calling the connection lost, or accepted messages look aborted.
            write_error = res.err().map(|e| format!("write: {e}"));
        }
        if !s.is_closed() {
            let now = Instant::now();
            let wait = s.deadline().map_or(Duration::from_secs(60), |d| {
                d.saturating_duration_since(now)
            });
            buf.clear();
            match monoio::time::timeout(wait, stream.read(buf)).await {
                Ok((Ok(0), b)) => {
                    buf = b;
                    s.connection_lost(write_error.as_deref().unwrap_or("closed by the server"));
                }
                Ok((Ok(_), b)) => {
                    buf = b;
                    s.receive(&buf, Instant::now());
                }
                Ok((Err(e), b)) => {
                    buf = b;
                    s.connection_lost(&format!("read: {e}"));
                }
                Err(_) => {
                    buf = Vec::with_capacity(READ_BUF_BYTES);
                    s.handle_timeout(Instant::now());
                }
            }
        }
        while let Some(ev) = s.poll_event() {
            match ev {
                Event::Ready => established = true,
                Event::TxDone { id, replies } => {
                    let (jobs, started) = inflight
                        .remove(&id)
                        .expect("events name transactions in flight");
                    let tx_ms = Some(started.elapsed().as_millis() as u64);
                    for (mut job, (stage, reply)) in jobs.into_iter().zip(replies) {
                        shard.outcome_timed(
                            &mut job,
                            &reply,
                            stage_name(stage),
                            Some(host),
                            Some(addr),
                            None,
                            tx_ms,
                        );
                    }
                }
                Event::TxAborted { id, reason } => {
                    let (jobs, _) = inflight
                        .remove(&id)
                        .expect("events name transactions in flight");
                    shard.requeue(site, jobs, &reason, Some(host), Some(addr));
                }
                Event::Closed { error, greeting } => {
                    if !established {
                        let why = match (error, greeting) {
                            (Some(e), _) => format!("{host} [{addr}]: {e}"),
                            (None, _) => format!("{host} [{addr}]: closed before EHLO"),
                        };
                        return Err(why);
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// Up to `max_rcpt_per_msg` jobs of the same domain and campaign from the front.
fn pop_batch(shard: &Shard, site: &Site) -> Option<Vec<Job>> {
    let mut q = site.queue.borrow_mut();
    let first = q.pop_front()?;
    let max = shard.instances[&first.instance].settings.max_rcpt_per_msg as usize;
    let mut jobs = vec![first];
    while jobs.len() < max {
        match q.front() {
            Some(j) if j.domain == jobs[0].domain && j.instance == jobs[0].instance => {
                jobs.push(q.pop_front().expect("front"))
            }
            _ => break,
        }
    }
    Some(jobs)
}

/// Renders the message for the first job's merge values, addressed to every job.
fn build_tx(shard: &Shard, jobs: &[Job]) -> Transaction {
    let inst = &shard.instances[&jobs[0].instance];
    let spool = shard.spool.borrow();
    // Recovery read every one of these records; the mapping cannot have changed since.
    let read = |j: &Job| {
        spool
            .read_queue(j.rref)
            .expect("a recovered record reads back")
    };
    let first = read(&jobs[0]);
    let mut content = Vec::new();
    inst.template.render(&first.values, &mut content);
    let rcpts = jobs
        .iter()
        .map(|j| {
            let v = spool
                .queue_value(j.rref, inst.email_col)
                .expect("a recovered record reads back");
            String::from_utf8_lossy(v).into_owned()
        })
        .collect();
    Transaction {
        id: shard.next_tx_id(),
        from: inst.settings.sender.clone(),
        rcpts,
        content,
    }
}
