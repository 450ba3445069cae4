//! Choosing monoio's driver: io_uring where the kernel allows it, epoll where it does
//! not (Docker's default seccomp profile blocks io_uring), or either on request so
//! both paths can be tested. Also the listening sockets a server binds once per
//! thread.

use std::future::Future;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Driver {
    /// io_uring if it works here, else epoll.
    #[default]
    Auto,
    IoUring,
    Epoll,
}

/// Runs `f` to completion on a monoio runtime with the chosen driver, on this thread.
/// Errors: the runtime cannot be built (for `IoUring`: the kernel or a seccomp
/// filter refuses io_uring; `Auto` then falls back to epoll).
pub fn block_on<F: Future>(driver: Driver, f: F) -> std::io::Result<F::Output> {
    block_on_reporting(driver, f).map(|(out, _)| out)
}

/// As [`block_on`], and says which driver ran: `IoUring` or `Epoll`, never `Auto`.
pub fn block_on_reporting<F: Future>(driver: Driver, f: F) -> std::io::Result<(F::Output, Driver)> {
    use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
    let epoll = |f: F| -> std::io::Result<(F::Output, Driver)> {
        Ok((
            RuntimeBuilder::<LegacyDriver>::new()
                .enable_timer()
                .build()?
                .block_on(f),
            Driver::Epoll,
        ))
    };
    // COOP_TASKRUN: completions wait for the thread's next entry into the kernel
    // rather than interrupting it; SINGLE_ISSUER: only this thread submits (a
    // shard's ring is its own), which spares the kernel its locking. Together 0.86x
    // the CPU per message (issue 15). Kernels before 6.0 refuse them: a plain ring then.
    let uring = || {
        let builder = || RuntimeBuilder::<IoUringDriver>::new().enable_timer();
        let mut b = io_uring::IoUring::builder();
        b.setup_coop_taskrun().setup_single_issuer();
        builder()
            .uring_builder(b)
            .build()
            .or_else(|_| builder().build())
    };
    match driver {
        Driver::Epoll => epoll(f),
        Driver::IoUring => Ok((uring()?.block_on(f), Driver::IoUring)),
        Driver::Auto => match uring() {
            Ok(mut rt) => Ok((rt.block_on(f), Driver::IoUring)),
            Err(_) => epoll(f),
        },
    }
}

/// Its name as `--driver` takes it and the report prints it (clap's, from the
/// variant's name).
impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => unreachable!("every driver is a --driver value"),
        }
    }
}

/// A non-blocking listening socket on `addr` that other threads may bind too
/// (SO_REUSEPORT: the kernel spreads connections over them), with room for
/// `backlog` connections not yet accepted. Errors: the address cannot be bound.
pub fn bind_reuseport(
    addr: std::net::SocketAddr,
    backlog: i32,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}
