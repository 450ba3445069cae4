//! A real browser for the status page's tests: Debian's chromium, headless, driven
//! over the Chrome DevTools Protocol on a pipe (`--remote-debugging-pipe`: commands
//! in on fd 3, answers and events out on fd 4, each a JSON text ending in NUL), so
//! no WebSocket client is needed. Every wait is bounded.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long one DevTools command may take to be answered.
pub const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Where Debian installs chromium (`apt-get install chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    to: File,
    from: Receiver<Value>,
    next_id: u64,
    session: Option<String>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    /// Starts chromium with its profile in `dir`; None (and a line on stderr saying
    /// the test is skipped, which `cargo test` shows) when chromium is not installed.
    pub fn start(dir: &Path) -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() {
            super::skipped(&format!(
                "{CHROMIUM} is not installed (apt-get install chromium); .ci/run installs it"
            ));
            return None;
        }
        let (cmd_read, cmd_write) = pipe();
        let (out_read, out_write) = pipe();
        let profile: PathBuf = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let mut c = Command::new(CHROMIUM);
        c.args([
            "--headless=new",
            // Root in a container: chromium's sandbox needs user namespaces.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-pipe",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let (r, w) = (
            std::os::fd::AsRawFd::as_raw_fd(&cmd_read),
            std::os::fd::AsRawFd::as_raw_fd(&out_write),
        );
        // SAFETY: only async-signal-safe calls (dup, dup2, fcntl) between fork and
        // exec.
        unsafe {
            c.pre_exec(move || {
                // The write end moved out of the way first if it sits at 3.
                let w = if w == 3 { libc::dup(w) } else { w };
                if w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 onto itself (a pipe end already at 3 or 4) keeps CLOEXEC.
                for fd in [3, 4] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        drop((cmd_read, out_write));
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = File::from(out_read);
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Some(Browser {
            child,
            to: File::from(cmd_write),
            from: rx,
            next_id: 0,
            session: None,
        })
    }

    /// One DevTools command on the page's session (once `open` made one); its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let deadline = Instant::now() + CALL_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v["id"] == id => {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
                // Events and other sessions' answers.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => panic!("{method}: no answer in {CALL_LIMIT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("{method}: chromium went away"),
            }
        }
    }

    /// A new tab of `width` x `height` CSS pixels showing `url`.
    pub fn open(&mut self, url: &str, width: u32, height: u32, mobile: bool) {
        self.session = None;
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
        self.call("Page.enable", json!({}));
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Evaluates `expr` in the page (a promise is awaited); its value.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` every 100 ms until it is truthy (not null, false, 0 or
    /// ""), at most `limit`; its value. Past that, panics with `why` and its last value.
    pub fn wait_for(&mut self, expr: &str, limit: Duration, why: &str) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expr);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "{why}: `{expr}` is still {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the whole page as it is now.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}
