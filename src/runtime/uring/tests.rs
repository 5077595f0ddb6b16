use std::cell::Cell;
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};

use super::net::{TcpListener, TcpStream};
use super::{RING, Ring, run_local, run_local_on};

/// Operations this thread's ring has in flight (or completed and not yet taken).
fn ops() -> usize {
    RING.with(|ring| ring.borrow().as_ref().map_or(0, |ring| ring.ops.len()))
}

fn pair() -> (TcpStream, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    (TcpStream::from_fd(ours.into()), theirs)
}

#[test]
fn reads_and_writes_go_through_the_ring() {
    run_local(async {
        let (ours, mut theirs) = pair();
        let (written, _) = ours.writev(vec![Bytes::from_static(b"hello")]).await;
        written.expect("write");
        let mut got = [0u8; 5];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");

        theirs.write_all(b"world").expect("write");
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(b">");
        let (read, buf) = ours.read(buf).await;
        assert_eq!(read.expect("read"), 5);
        assert_eq!(&buf[..], b">world", "appended after what the buffer held");

        drop(theirs);
        let (read, _) = ours.read(BytesMut::with_capacity(8)).await;
        assert_eq!(read.expect("read at end"), 0);
        assert_eq!(ops(), 0);
    });
}

/// More chunks than one `sendmsg` takes (`IOV_MAX`), and more bytes than the socket
/// buffer holds: every byte arrives, in order.
#[test]
fn a_vectored_write_continues_after_partial_writes() {
    run_local(async {
        let (ours, mut theirs) = pair();
        let chunks: Vec<Bytes> = (0..3000u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; 700 + (i as usize % 13)]))
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let total = expected.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            theirs.read_exact(&mut got).expect("read all");
            got
        });
        let (written, left) = ours.writev(chunks).await;
        written.expect("writev");
        assert!(left.is_empty());
        assert_eq!(reader.join().expect("reader"), expected);
    });
}

/// A read whose future is dropped keeps its buffer and socket until the kernel is
/// done: the socket is still open for the peer, and the slot goes once the read
/// completes.
#[test]
fn a_dropped_read_lives_until_its_completion() {
    run_local(async {
        let (ours, mut theirs) = pair();
        {
            let read = ours.read(BytesMut::with_capacity(16));
            tokio::pin!(read);
            // Polled once: queued, then dropped in flight.
            let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
        }
        assert_eq!(ops(), 1, "kept for the kernel");
        drop(ours);
        // The operation holds the descriptor: the peer's write still lands.
        theirs.write_all(b"x").expect("the socket is still open");
        for _ in 0..1000 {
            if ops() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(ops(), 0, "the completion freed the slot");
        let mut rest = Vec::new();
        theirs
            .read_to_end(&mut rest)
            .expect("closed once the read completed");
    });
}

/// Submission does not wait for the thread to park: a read queued while another task
/// keeps the core busy (yielding in a loop, never idle) reaches the kernel and
/// completes during that loop. (tokio-uring 0.5 submitted only when the thread parked,
/// so this read waited for the whole loop.)
#[test]
fn a_busy_core_still_submits_and_completes() {
    run_local(async {
        let (ours, mut theirs) = pair();
        theirs.write_all(b"ready").expect("write");
        let done = Rc::new(Cell::new(false));
        let reader = {
            let done = done.clone();
            tokio::task::spawn_local(async move {
                let (read, _) = ours.read(BytesMut::with_capacity(16)).await;
                assert_eq!(read.expect("read"), 5);
                done.set(true);
            })
        };
        let mut turns = 0;
        while !done.get() && turns < 100_000 {
            tokio::task::yield_now().await;
            turns += 1;
        }
        assert!(done.get(), "the read completed while the core stayed busy");
        assert!(turns < 100, "within a few turns of the core, took {turns}");
        reader.await.expect("reader");
    });
}

/// At the end, reads still waiting (nobody writes to their sockets) are cancelled
/// and waited for; nothing is left in flight and nothing is leaked.
#[test]
fn teardown_cancels_what_is_in_flight() {
    let peers = run_local(async {
        let mut peers = Vec::new();
        for _ in 0..8 {
            let (ours, theirs) = pair();
            peers.push(theirs);
            tokio::task::spawn_local(async move {
                let _ = ours.read(BytesMut::with_capacity(16)).await;
            });
        }
        // Let the reads reach the kernel.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(ops(), 8);
        peers
    });
    assert!(RING.with(|ring| ring.borrow().is_none()), "the ring ended");
    for mut peer in peers {
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest)
            .expect("our side closed once its read was cancelled");
    }
}

#[test]
fn accepts_give_the_stream_and_the_peer_address() {
    run_local(async {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = std_listener.local_addr().expect("addr");
        let listener = TcpListener::from_std(std_listener);
        let client = std::thread::spawn(move || {
            let mut client = std::net::TcpStream::connect(addr).expect("connect");
            let local = client.local_addr().expect("local");
            client.write_all(b"hi").expect("write");
            local
        });
        let (stream, peer) = listener.accept().await.expect("accept");
        let (read, buf) = stream.read(BytesMut::with_capacity(8)).await;
        assert_eq!(read.expect("read"), 2);
        assert_eq!(&buf[..], b"hi");
        assert_eq!(peer, client.join().expect("client"));
    });
}

/// More completions at once than the completion queue holds (here 16): the kernel
/// keeps the rest aside and hands them over only on an io_uring_enter, which nothing
/// else makes once no new operation is queued. Every read still completes. (Before
/// the reap flushed them, 10,000 subscribers answering a heartbeat round at once left
/// some of their connections' operations waiting for good: lost deliveries in
/// `bench broadcast` at 10,000 subscribers.)
#[test]
fn completions_beyond_the_completion_queue_are_not_lost() {
    const READS: usize = 200;
    run_local_on(
        Ring::with_completions(8, 16).expect("a small ring"),
        async {
            let done = Rc::new(Cell::new(0usize));
            let mut peers = Vec::new();
            for _ in 0..READS {
                let (ours, theirs) = pair();
                peers.push(theirs);
                let done = done.clone();
                tokio::task::spawn_local(async move {
                    let (read, _) = ours.read(BytesMut::with_capacity(8)).await;
                    assert_eq!(read.expect("read"), 1);
                    done.set(done.get() + 1);
                });
            }
            // Every read reaches the kernel before any completes.
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            assert_eq!(ops(), READS);
            for peer in &mut peers {
                peer.write_all(b"x").expect("write");
            }
            let mut turns = 0;
            while done.get() < READS && turns < 100_000 {
                tokio::task::yield_now().await;
                turns += 1;
            }
            assert_eq!(done.get(), READS, "every read completed");
        },
    );
}
