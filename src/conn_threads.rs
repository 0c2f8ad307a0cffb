//! The threads that serve connections: one single-threaded tokio runtime per
//! core, each connection served by one of them for its whole life.
//!
//! Everything else (the accept loops, the publisher, reloads, and the admin
//! listener's connections, so that a connection thread held up by a stalled
//! disk cannot fail the probes) stays on the multi-threaded runtime of
//! `main.rs`. Connections do not need its work
//! stealing: HTTP/1 serves one request at a time per connection, and
//! spreading the connections over the threads spreads the load. What the
//! stealing cost them is measured: under wrk (32 keep-alive connections, 2
//! cores) the workers woke and parked each other through futexes on every
//! few requests (4% of the CPU samples in those wake-ups alone); served
//! here, the same load took 21–22 µs of CPU per request against 25–27, and
//! 56–58k against 50–53k requests a second (bench/README.md).
//!
//! When the process was given CPUs of its own (a cpuset), exactly as many
//! as threads, or `TIMBRIDGE_PIN_THREADS=on` says so, each thread is
//! pinned to one CPU (see [`choose_cpus`] for why and when not).
//!
//! A connection goes to the thread with the fewest open connections, so that
//! one thread is not left with the long-lived ones while another idles. The
//! threads live as long as the process; those that cannot be started are
//! said in a warning, and with none the connections are served on the
//! caller's runtime.
//!
//! The price: a request that blocks its thread (an append waiting for the
//! spool writer's lock, which it takes only once 16 MiB of appends wait for
//! a stalled disk) holds up the other connections on that thread, where the
//! multi-threaded runtime would have moved them to another worker. A
//! proxied request may also use a pooled upstream connection that another
//! thread opened and drives.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// One connection thread: its runtime and how many connections it serves.
struct Thread {
    runtime: Handle,
    open: Arc<AtomicUsize>,
}

/// Serves `serve(stream)` on the process's connection threads, started by
/// [`start`] or on first use: on the thread with the fewest connections,
/// its socket registered with that thread's reactor.
pub fn spawn<F, Fut>(stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    pool().spawn(stream, serve);
}

/// Starts the process's connection threads, if not yet started: one per
/// CPU the process may use (`available_parallelism` reads the cgroup's CPU
/// quota and the affinity mask), or `TOKIO_WORKER_THREADS`, which sizes the
/// main runtime too. Those that cannot be started are said in a warning;
/// with none, connections are served on the main runtime.
pub fn start() {
    pool();
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = Pool::start(n, pin_plan(n));
        if pool.threads.len() < n {
            tracing::warn!(
                started = pool.threads.len(),
                wanted = n,
                "cannot start every connection thread (a thread or file limit?); serving connections on those that started, or on the main runtime"
            );
        }
        pool
    })
}

/// A set of connection threads.
struct Pool {
    threads: Vec<Thread>,
}

impl Pool {
    /// Starts `n` threads, each running a single-threaded runtime until the
    /// process ends; fewer if some cannot be started (the error is logged).
    fn start(n: usize, cpus: Option<Vec<usize>>) -> Pool {
        let threads = (0..n)
            .filter_map(|i| {
                start_thread(i, cpus.as_ref().and_then(|c| c.get(i).copied()))
                    .map_err(|e| tracing::warn!(error = %e, "cannot start connection thread {i}"))
                    .ok()
            })
            .collect();
        Pool { threads }
    }

    /// Serves `serve(stream)` on the thread with the fewest connections; on
    /// the caller's runtime if there is none. The stream moves there: its
    /// socket is registered with that thread's reactor, so that its
    /// wake-ups stay on the thread.
    fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(thread) = self
            .threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
        else {
            tokio::spawn(serve(stream));
            return;
        };
        // Deregistered from this reactor here, registered with the thread's
        // there: one epoll_ctl each, once per connection.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot move a connection to its thread; closed it");
                return;
            }
        };
        let open = OpenConnection::enter(thread.open.clone());
        thread.runtime.spawn(async move {
            let _open = open;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "cannot register a connection with its thread; closed it"),
            }
        });
    }
}

/// Counts one connection on its thread while it lives, unwinding included.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn enter(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The runtime is built on its own thread: dropped on a runtime thread (a
/// failed start), it would panic. With `cpu`, the thread runs on that CPU
/// only (see [`pin_plan`]); the threads its runtime starts for blocking
/// work (an upstream's DNS lookups) get the mask it had before, rather
/// than inherit its one CPU.
fn start_thread(i: usize, cpu: Option<usize>) -> std::io::Result<Thread> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("conn-{i}"))
        .spawn(move || {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            if let Some(cpu) = cpu {
                let before = allowed_cpus();
                match set_affinity(&[cpu]) {
                    Ok(()) => {
                        if let Ok(before) = before {
                            builder.on_thread_start(move || {
                                let _ = set_affinity(&before);
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot pin connection thread {i} to CPU {cpu}; it runs wherever the kernel puts it"),
                }
            }
            let runtime = builder.enable_all().build();
            match runtime {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    // Runs the connections' tasks until the process ends.
                    runtime.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    let runtime = rx
        .recv()
        .map_err(|_| std::io::Error::other("the thread ended before its runtime started"))??;
    Ok(Thread {
        runtime,
        open: Arc::new(AtomicUsize::new(0)),
    })
}

/// The CPUs to pin the `n` connection threads to, one each, as
/// `TIMBRIDGE_PIN_THREADS` and the process's affinity mask say (see
/// [`choose_cpus`]). Anything unexpected is said in a warning, and the
/// threads are then not pinned. Decided once, at start: CPUs a cpuset
/// gains later are not used by the connection threads, and a thread whose
/// CPU is taken away runs on the others.
fn pin_plan(n: usize) -> Option<Vec<usize>> {
    let setting = std::env::var("TIMBRIDGE_PIN_THREADS").ok();
    if setting.as_deref() == Some("off") {
        return None;
    }
    let allowed = allowed_cpus()
        .map_err(|e| tracing::warn!(error = %e, "cannot read which CPUs this process may use; connection threads are not pinned"))
        .ok()?;
    // SAFETY: sysconf only reads a system value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(0) as usize;
    match choose_cpus(n, setting.as_deref(), &allowed, online) {
        Ok(Some(cpus)) => {
            tracing::info!(?cpus, "connection threads pinned, one to each CPU");
            Some(cpus)
        }
        Ok(None) => None,
        Err(why) => {
            tracing::warn!("{why}; connection threads are not pinned");
            None
        }
    }
}

/// Where the `n` connection threads run, from `TIMBRIDGE_PIN_THREADS`, the
/// CPUs the process may use (`allowed`) and the CPUs online:
///
/// - `auto` (the default) pins them only to CPUs the process was given for
///   its own: an affinity mask narrower than the machine (a cpuset, as
///   Kubernetes' static CPU manager gives a Guaranteed pod whole CPUs, or
///   `docker --cpuset-cpus`, or taskset) holding exactly `n` CPUs, at
///   least two. A process that may run anywhere, with a CPU quota or
///   without (a sidecar on a shared node), is left to the kernel, which
///   moves a thread off a CPU a neighbour keeps busy: a pinned thread could
///   not move, and its connections would wait.
/// - `on` pins thread `i` to the `i`-th allowed CPU (round again when there
///   are fewer CPUs than threads): for a machine that runs the gateway and
///   little else.
/// - `off` never pins.
///
/// Why pin at all: left free, the kernel's scheduler often ran both
/// connection threads on one CPU, beside the thread that woke them, while
/// the other CPU idled. Under wrk (32 keep-alive connections, a machine of
/// 2 CPUs, `on`) a third of a CPU sat idle unpinned and a fifth pinned,
/// and the gateway answered 3-6% more callbacks (bench/README.md).
fn choose_cpus(
    n: usize,
    setting: Option<&str>,
    allowed: &[usize],
    online: usize,
) -> Result<Option<Vec<usize>>, String> {
    Ok(match setting {
        None | Some("" | "auto") => {
            (n >= 2 && allowed.len() == n && allowed.len() < online).then(|| allowed.to_vec())
        }
        Some("on") if !allowed.is_empty() => {
            Some((0..n).map(|i| allowed[i % allowed.len()]).collect())
        }
        Some("on" | "off") => None,
        Some(other) => {
            return Err(format!(
                "TIMBRIDGE_PIN_THREADS={other:?} is not \"auto\" (the default), \"on\" or \"off\""
            ));
        }
    })
}

/// The CPUs the calling thread may run on (its affinity mask).
fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; the kernel writes
    // at most `size` bytes into it, and CPU_ISSET reads within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Lets the calling thread run on `cpus` only.
fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    if let Some(&cpu) = cpus.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(std::io::Error::other(format!(
            "CPU {cpu} is past the largest CPU set"
        )));
    }
    // SAFETY: as in `allowed_cpus`; every CPU is within the set (above).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};

    /// Opens a connection, serves it with `spawn`, and returns the client
    /// end with the name of the thread that ran the server end.
    async fn connect(
        pool: &Pool,
        listener: &TcpListener,
        release: oneshot::Receiver<()>,
        names: mpsc::UnboundedSender<String>,
    ) -> TcpStream {
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let (server, _) = accepted.unwrap();
        pool.spawn(server, move |mut stream| async move {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            // Echo one line: the socket works on the thread it moved to.
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(&buf).await.unwrap();
            let _ = names.send(name);
            let _ = release.await;
        });
        client.unwrap()
    }

    #[test]
    fn threads_are_pinned_by_default_only_to_cpus_of_the_process_own() {
        // A cpuset of exactly as many CPUs as threads, narrower than the
        // machine's 8.
        assert_eq!(choose_cpus(2, None, &[4, 7], 8), Ok(Some(vec![4, 7])));
        assert_eq!(
            choose_cpus(2, Some("auto"), &[0, 1], 8),
            Ok(Some(vec![0, 1]))
        );
        assert_eq!(choose_cpus(2, Some(""), &[0, 1], 8), Ok(Some(vec![0, 1])));
        // The whole machine (a shared node): the kernel keeps placing them.
        assert_eq!(choose_cpus(2, None, &[0, 1], 2), Ok(None));
        // A cpuset of another size, and one thread, gain nothing.
        assert_eq!(choose_cpus(2, None, &[0, 1, 2, 3], 8), Ok(None));
        assert_eq!(choose_cpus(4, None, &[0, 1], 8), Ok(None));
        assert_eq!(choose_cpus(1, None, &[3], 8), Ok(None));
        // Asked for: one CPU each, round again past the last.
        assert_eq!(choose_cpus(2, Some("on"), &[0, 1], 2), Ok(Some(vec![0, 1])));
        assert_eq!(
            choose_cpus(3, Some("on"), &[2, 5], 8),
            Ok(Some(vec![2, 5, 2]))
        );
        assert_eq!(choose_cpus(2, Some("off"), &[0, 1], 8), Ok(None));
        let err = choose_cpus(2, Some("yes"), &[0, 1], 8).unwrap_err();
        assert!(err.contains("\"on\"") && err.contains("\"off\""), "{err}");
    }

    /// Each pinned thread really runs on its one CPU only, read back from
    /// the kernel on the thread itself, while the threads its runtime
    /// starts for blocking work keep the whole mask.
    #[tokio::test]
    async fn a_pinned_connection_thread_runs_on_its_cpu_only() {
        let allowed = allowed_cpus().unwrap();
        if allowed.len() < 2 {
            eprintln!("one CPU: nothing to tell a pinned thread from a free one");
            return;
        }
        let cpus = allowed[..2].to_vec();
        let pool = Pool::start(2, Some(cpus.clone()));
        let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
        let mut masks = Vec::new();
        for thread in &pool.threads {
            let mask = thread.runtime.spawn(async { allowed_cpus().unwrap() });
            masks.push(within(mask).await.unwrap().unwrap());
            // Started from the pinned thread itself, as an upstream's DNS
            // lookup is.
            let blocking = thread.runtime.spawn(async {
                tokio::task::spawn_blocking(|| allowed_cpus().unwrap())
                    .await
                    .unwrap()
            });
            assert_eq!(within(blocking).await.unwrap().unwrap(), allowed);
        }
        assert_eq!(masks, vec![vec![cpus[0]], vec![cpus[1]]]);
        // Unpinned, a thread keeps the whole mask.
        let free = Pool::start(1, None);
        let mask = free.threads[0]
            .runtime
            .spawn(async { allowed_cpus().unwrap() });
        assert_eq!(within(mask).await.unwrap().unwrap(), allowed);
    }

    #[tokio::test]
    async fn connections_go_to_the_least_busy_connection_thread() {
        let pool = Pool::start(3, None);
        assert_eq!(pool.threads.len(), 3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (names_tx, mut names) = mpsc::unbounded_channel();
        let mut open = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (release, wait) = oneshot::channel();
            let mut client = connect(&pool, &listener, wait, names_tx.clone()).await;
            client.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"ping");
            seen.push(names.recv().await.unwrap());
            open.push((client, release));
            if seen.len() == 3 {
                // Each thread has one; the second one's connection ends (round
                // robin would give the next one to the first's thread).
                let distinct: std::collections::HashSet<_> = seen.iter().collect();
                assert_eq!(distinct.len(), 3, "served on {seen:?}");
                assert!(seen.iter().all(|n| n.starts_with("conn-")));
                drop(open.remove(1));
                let one_idle = async {
                    while pool
                        .threads
                        .iter()
                        .all(|t| t.open.load(Ordering::Relaxed) > 0)
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                };
                tokio::time::timeout(std::time::Duration::from_secs(10), one_idle)
                    .await
                    .expect("an ended connection is still counted on its thread");
            }
        }
        // The fourth went to the thread left idle, not onto a busy one.
        assert_eq!(seen[3], seen[1], "served on {seen:?}");
    }
}
