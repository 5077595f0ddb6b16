use super::core::with_core;
use super::*;

#[test]
fn conflation_patterns_match_exact_names_and_prefixes() {
    let hub = Hub::default();
    hub.conflate("cursor", Duration::from_millis(16));
    hub.conflate("prices:*", Duration::from_millis(100));
    assert_eq!(
        hub.conflation_window("cursor"),
        Some(Duration::from_millis(16))
    );
    assert_eq!(hub.conflation_window("cursors"), None);
    assert_eq!(
        hub.conflation_window("prices:eur"),
        Some(Duration::from_millis(100))
    );
    assert_eq!(hub.conflation_window("chat"), None);
}

/// What goes to the broker is the message's kind and payload, not a copy.
#[test]
fn publishes_reach_the_broker_as_kind_and_payload() {
    let payload = Bytes::from(vec![0xa5u8; 70_000]);
    let (kind, sent) = broker_payload(&Message::Binary(payload.clone()));
    assert_eq!((kind, &sent), (Kind::Binary, &payload));
    assert_eq!(sent.as_ptr(), payload.as_ptr());
    assert_eq!(
        broker_payload(&Message::Text("héllo".into())),
        (Kind::Text, Bytes::from("héllo"))
    );
}

#[test]
fn publishing_before_the_server_runs_is_an_error() {
    let publisher = Publisher::new(Arc::new(Hub::default()));
    assert_eq!(
        publisher.publish_text("t", "x"),
        Err(PublishError::NotRunning)
    );
    assert_eq!(publisher.publish_text("", "x"), Err(PublishError::BadTopic));
    let long = "t".repeat(MAX_TOPIC_LEN + 1);
    assert_eq!(
        publisher.publish_text(&long, "x"),
        Err(PublishError::BadTopic)
    );
}

#[test]
fn a_hub_binds_to_one_server_only() {
    let hub = Hub::default();
    hub.bind(2).unwrap();
    assert!(hub.bind(2).is_err());
}

/// One publish puts one message in each core's inbox, not one per subscriber; a full
/// inbox drops (and counts) rather than blocking the publisher.
#[test]
fn fan_out_sends_one_message_per_core_and_never_blocks() {
    let hub = Arc::new(Hub::new(2));
    hub.bind(3).unwrap();
    let mut receivers: Vec<_> = (0..3)
        .map(|i| lock(&hub.receivers)[i].take().unwrap())
        .collect();
    let publisher = Publisher::new(hub.clone());
    for _ in 0..3 {
        publisher.publish_text("t", "m").unwrap();
    }
    for rx in &mut receivers {
        assert_eq!(rx.len(), 2);
    }
    assert_eq!(hub.metrics.inbox_dropped.load(Ordering::Relaxed), 3);
    assert_eq!(hub.metrics.published.load(Ordering::Relaxed), 3);
}

/// Messages from other processes are framed once and queued to every core.
#[test]
fn broker_messages_reach_every_core() {
    let hub = Arc::new(Hub::default());
    hub.bind(2).unwrap();
    let mut receivers: Vec<_> = (0..2)
        .map(|i| lock(&hub.receivers)[i].take().unwrap())
        .collect();
    let sink = Publisher::new(hub.clone()).broker_sink();
    let _ = sink(Inbound::new("t", Kind::Text, Bytes::from_static(b"hi")));
    for rx in &mut receivers {
        let delivery = rx.try_recv().unwrap();
        assert_eq!(&*delivery.topic, "t");
        assert_eq!(&delivery.frame[..], b"\x81\x02hi");
    }
}

/// Runs `test` on this thread as core 0 of a one-core hub, inside a `LocalSet` (the
/// conflation timers are local tasks). Topic `"c"` is conflated with `window`.
fn on_a_core(max_outbound_bytes: usize, window: Duration, test: impl AsyncFnOnce(Arc<Hub>)) {
    on_a_core_with(Hub::default(), max_outbound_bytes, window, test);
}

/// [`on_a_core`] with a hub of one's own (a small inbox, say).
fn on_a_core_with(
    hub: Hub,
    max_outbound_bytes: usize,
    window: Duration,
    test: impl AsyncFnOnce(Arc<Hub>),
) {
    let hub = Arc::new(hub);
    hub.conflate("c", window);
    hub.bind(1).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let inbox = hub.core_task(0, max_outbound_bytes).unwrap();
        tokio::task::spawn_local(inbox);
        test(hub).await;
    });
}

fn session() -> crate::runtime::Session {
    crate::runtime::Session::driverless()
}

/// The payloads of the text frames queued for `session` (taken out of its queue).
fn take_texts(session: &crate::runtime::Session) -> Vec<String> {
    let bytes = session.take_queued();
    let mut texts = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        // Server frames: FIN + opcode, then a 7-bit or 16-bit length, unmasked.
        let (len, header) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            n => (usize::from(n), 2),
        };
        if rest[0] == 0x81 {
            texts.push(String::from_utf8(rest[header..header + len].to_vec()).unwrap());
        }
        rest = &rest[header + len..];
    }
    texts
}

fn publish_keyed(sender: &crate::runtime::Session, key: &str, text: &str) {
    publish_from_session(
        sender,
        "c",
        &Message::Text(text.to_owned().into()),
        Some(Bytes::copy_from_slice(key.as_bytes())),
        false,
    )
    .unwrap();
}

/// Distinct keys from clients cannot grow a window without bound: at
/// `MAX_CONFLATION_KEYS` keys the window goes out at once, long before its end.
#[test]
fn a_full_conflation_window_is_delivered_early() {
    on_a_core(64 << 20, Duration::from_secs(3600), async |hub| {
        let (viewer, sender) = (session(), session());
        subscribe(&viewer, "c").unwrap();
        publish_keyed(&sender, "k0", "first");
        assert_eq!(take_texts(&viewer), ["first"]);
        for i in 1..MAX_CONFLATION_KEYS {
            publish_keyed(&sender, &format!("k{i}"), &format!("v{i}"));
        }
        // A key sent twice within the window is superseded, not another key.
        publish_keyed(&sender, "k1", "v1'");
        assert!(take_texts(&viewer).is_empty(), "the window is not over");
        let early = |hub: &Hub| hub.metrics.conflation_early_flushes.load(Ordering::Relaxed);
        assert_eq!(early(&hub), 0);
        publish_keyed(&sender, "last", "last");
        let texts = take_texts(&viewer);
        assert_eq!(texts.len(), MAX_CONFLATION_KEYS);
        // In the order of each key's latest value: k1's moved behind the others.
        assert_eq!(texts[0], "v2");
        assert_eq!(texts[texts.len() - 2], "v1'");
        assert_eq!(texts.last().map(String::as_str), Some("last"));
        assert_eq!(early(&hub), 1);
        assert_eq!(hub.metrics.conflated.load(Ordering::Relaxed), 1);
        let metrics = crate::metrics::render_collector(hub.clone());
        assert!(
            metrics.contains("ringsocket_pubsub_conflation_early_flushes_total 1"),
            "{metrics}"
        );
    });
}

/// A lagging subscriber is held at most `MAX_HELD_KEYS` keys: past it the oldest are
/// dropped (down to three quarters) and counted; the newest values survive and reach
/// it once it has drained.
#[test]
fn a_lagging_subscriber_holds_a_bounded_number_of_keys() {
    const SOFT_LIMIT: usize = 1 << 20;
    on_a_core(2 * SOFT_LIMIT, Duration::from_secs(3600), async |hub| {
        let (viewer, sender) = (session(), session());
        subscribe(&viewer, "c").unwrap();
        // Above the soft limit: the viewer lags.
        viewer.send_binary(vec![0u8; SOFT_LIMIT + 1]).unwrap();
        let dropped = |hub: &Hub| hub.metrics.conflation_dropped.load(Ordering::Relaxed);
        for i in 0..=MAX_CONFLATION_KEYS {
            publish_keyed(&sender, &format!("k{i}"), &format!("a{i}"));
        }
        // k0 was held at once, k1..=k4096 at the early flush: 4,097 keys, cut to 3,072.
        let expected = (MAX_HELD_KEYS + 1 - MAX_HELD_KEYS / 4 * 3) as u64;
        assert_eq!(dropped(&hub), expected);
        assert!(
            take_texts(&viewer).is_empty(),
            "only the big binary was queued"
        );

        // Drained: the next window delivers what is held, newest values first held.
        for i in 1..=MAX_CONFLATION_KEYS {
            publish_keyed(&sender, &format!("k{i}"), &format!("b{i}"));
        }
        let texts = take_texts(&viewer);
        assert_eq!(texts.len(), MAX_HELD_KEYS);
        assert!(texts.iter().all(|t| t.starts_with('b')), "{texts:?}");
        assert_eq!(dropped(&hub), expected);
        let metrics = crate::metrics::render_collector(hub.clone());
        assert!(
            metrics.contains(&format!(
                "ringsocket_pubsub_conflation_dropped_total {expected}"
            )),
            "{metrics}"
        );
    });
}

/// A subscriber whose connection is closing leaves its topics at the first publish
/// that cannot reach it, not when its close completes; its teardown later changes
/// nothing (and counts nothing twice).
#[test]
fn a_closing_subscriber_leaves_its_topics_at_the_next_publish() {
    on_a_core(64 << 20, Duration::from_secs(3600), async |hub| {
        let (closing, staying, sender) = (session(), session(), session());
        for topic in ["plain", "c", "other"] {
            subscribe(&closing, topic).unwrap();
        }
        subscribe(&staying, "plain").unwrap();
        subscribe(&staying, "c").unwrap();
        assert_eq!(hub.subscriptions(), 5);
        closing.close(crate::proto::CloseCode::Again, "slow consumer");

        publish_from_session(&sender, "plain", &Message::Text("p".into()), None, false).unwrap();
        assert_eq!(hub.subscribers("plain"), 1);
        publish_keyed(&sender, "k", "c");
        assert_eq!(hub.subscribers("c"), 1);
        assert_eq!(topics_of(&closing), ["other"]);
        assert_eq!(take_texts(&staying), ["p", "c"]);

        closing.run_teardown();
        assert_eq!(hub.subscriptions(), 2);
        assert_eq!(hub.core_subscriptions(), [2]);
        assert_eq!(hub.topics(), 2);
    });
}

/// The byte bounds count keys too: keys may be as long as messages. A window whose keys
/// and values pass half of `max_outbound_bytes` is delivered early, and a lagging
/// subscriber's held keys and values are cut to three quarters of that.
#[test]
fn conflation_byte_bounds_count_the_keys() {
    const SOFT_LIMIT: usize = 1 << 20;
    on_a_core(2 * SOFT_LIMIT, Duration::from_secs(3600), async |hub| {
        let (viewer, lagging, sender) = (session(), session(), session());
        subscribe(&viewer, "c").unwrap();
        subscribe(&lagging, "c").unwrap();
        lagging.send_binary(vec![0u8; SOFT_LIMIT + 1]).unwrap();
        // 300 KiB keys, one-byte values.
        let key = |i: u8| format!("{}", char::from(b'a' + i)).repeat(300 << 10);
        publish_keyed(&sender, &key(0), "0");
        assert_eq!(take_texts(&viewer), ["0"]);
        for i in 1..=3 {
            publish_keyed(&sender, &key(i), &i.to_string());
        }
        assert!(
            take_texts(&viewer).is_empty(),
            "900 KiB pending: not full yet"
        );
        publish_keyed(&sender, &key(4), "4");
        assert_eq!(take_texts(&viewer), ["1", "2", "3", "4"]);
        assert_eq!(
            hub.metrics.conflation_early_flushes.load(Ordering::Relaxed),
            1
        );
        // Held for the lagging one: keys 0..=3 reach 1.2 MiB, cut to at most 768 KiB by
        // dropping 0 and 1; then 4 makes 900 KiB, within the limit.
        assert_eq!(hub.metrics.conflation_dropped.load(Ordering::Relaxed), 2);
    });
}

/// Topic names and the number of topics per session are bounded.
#[test]
fn subscriptions_are_bounded() {
    on_a_core(1 << 20, Duration::from_secs(1), async |hub| {
        let member = session();
        assert_eq!(subscribe(&member, ""), Err(SubscribeError::BadTopic));
        let long = "t".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(subscribe(&member, &long), Err(SubscribeError::BadTopic));
        assert_eq!(subscribe(&member, &"t".repeat(MAX_TOPIC_LEN)), Ok(true));
        for i in 1..MAX_TOPICS_PER_SESSION {
            assert_eq!(subscribe(&member, &format!("t{i}")), Ok(true));
        }
        assert_eq!(
            subscribe(&member, "one too many"),
            Err(SubscribeError::TooManyTopics)
        );
        // Already in it: not a new topic, so not refused.
        assert_eq!(subscribe(&member, "t1"), Ok(false));
        assert_eq!(hub.subscriptions(), MAX_TOPICS_PER_SESSION);
        member.run_teardown();
        assert_eq!(hub.subscriptions(), 0);
        assert_eq!(hub.topics(), 0);
    });
}

fn publish(sender: &crate::runtime::Session, topic: &str, text: &str, include_self: bool) {
    let message = Message::Text(text.to_owned().into());
    publish_from_session(sender, topic, &message, None, include_self).unwrap();
}

/// A session in one plain topic follows the topic's feed (a publish appends once for
/// all of them); what the handler sends itself still comes after the broadcasts
/// published before it, and a Close after them too.
#[test]
fn a_feed_follower_gets_broadcasts_and_its_own_sends_in_order() {
    on_a_core(1 << 20, Duration::from_secs(1), async |hub| {
        let (member, sender) = (session(), session());
        subscribe(&member, "plain").unwrap();
        assert!(with_core(|core| core.follows_feed(&member, "plain")).unwrap());
        publish(&sender, "plain", "p1", false);
        publish(&sender, "plain", "p2", false);
        member.send_text("own").unwrap();
        publish(&sender, "plain", "p3", false);
        assert_eq!(take_texts(&member), ["p1", "p2", "own", "p3"]);
        // Nothing is given twice.
        publish(&sender, "plain", "p4", false);
        assert_eq!(take_texts(&member), ["p4"]);
        assert_eq!(hub.metrics.delivered.load(Ordering::Relaxed), 4);

        publish(&sender, "plain", "p5", false);
        member.close(crate::proto::CloseCode::Normal, "bye");
        let bytes = member.take_queued();
        // The text frame "p5", then the Close (opcode 8).
        assert_eq!(&bytes[..4], b"\x81\x02p5");
        assert_eq!(bytes[4], 0x88);
        member.run_teardown();
        assert_eq!(hub.topics(), 0);
    });
}

/// A follower that joins a second topic is sent the frames of both in the order they
/// were published (it leaves the feed, with what it was owed); back in one topic, it
/// follows the feed again, without a frame lost or given twice.
#[test]
fn joining_and_leaving_a_second_topic_keeps_the_order() {
    on_a_core(1 << 20, Duration::from_secs(1), async |hub| {
        let (member, sender) = (session(), session());
        subscribe(&member, "a").unwrap();
        publish(&sender, "a", "a1", false);
        subscribe(&member, "b").unwrap();
        assert!(!with_core(|core| core.follows_feed(&member, "a")).unwrap());
        publish(&sender, "b", "b1", false);
        publish(&sender, "a", "a2", false);
        publish(&sender, "b", "b2", false);
        assert!(unsubscribe(&member, "b"));
        assert!(with_core(|core| core.follows_feed(&member, "a")).unwrap());
        publish(&sender, "a", "a3", false);
        publish(&sender, "b", "b3", false);
        assert_eq!(take_texts(&member), ["a1", "b1", "a2", "b2", "a3"]);
        member.run_teardown();
        assert_eq!(hub.subscriptions(), 0);
        assert_eq!(hub.topics(), 0);
    });
}

/// A publish without the sender skips only the sender, also when both follow the
/// topic's feed, and the sender still gets what was published before and after.
#[test]
fn a_publish_without_the_sender_skips_only_the_sender_on_a_feed() {
    on_a_core(1 << 20, Duration::from_secs(1), async |hub| {
        let (sender, other) = (session(), session());
        subscribe(&sender, "room").unwrap();
        subscribe(&other, "room").unwrap();
        publish(&sender, "room", "m1", true);
        publish(&sender, "room", "m2", false);
        publish(&other, "room", "m3", false);
        publish(&sender, "room", "m4", true);
        assert_eq!(take_texts(&sender), ["m1", "m3", "m4"]);
        assert_eq!(take_texts(&other), ["m1", "m2", "m4"]);
        // Deliveries: 2 + 1 + 1 + 2.
        assert_eq!(hub.metrics.delivered.load(Ordering::Relaxed), 6);
        other.run_teardown();
        sender.run_teardown();
        assert_eq!(hub.topics(), 0);
    });
}

/// The route counts every topic of a session, conflated ones too, and changes only
/// between one topic and more: in three topics and back to two, a session stays on
/// direct copies; in one, it follows the feed again; the order is kept throughout.
#[test]
fn the_route_follows_the_number_of_topics() {
    on_a_core(1 << 20, Duration::from_secs(1), async |hub| {
        let (member, sender) = (session(), session());
        let follows = |topic: &str| with_core(|core| core.follows_feed(&member, topic)).unwrap();
        subscribe(&member, "a").unwrap();
        assert!(follows("a"));
        // A conflated topic is sent as direct copies: "a" leaves its feed.
        subscribe(&member, "c").unwrap();
        assert!(!follows("a"));
        subscribe(&member, "b").unwrap();
        assert!(!follows("a") && !follows("b"));
        publish(&sender, "a", "a1", false);
        publish_keyed(&sender, "k", "c1");
        publish(&sender, "b", "b1", false);
        assert!(unsubscribe(&member, "b"));
        assert!(!follows("a"), "still in two topics");
        publish(&sender, "a", "a2", false);
        assert!(unsubscribe(&member, "c"));
        assert!(follows("a"));
        publish(&sender, "a", "a3", false);
        assert_eq!(take_texts(&member), ["a1", "c1", "b1", "a2", "a3"]);
        member.run_teardown();
        assert_eq!(hub.topics(), 0);
    });
}

fn rows(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
}

/// The most subscribed topics are shown, ties by name, the rest summed in `_other`.
#[test]
fn metrics_show_the_top_topics_and_sum_the_rest() {
    let all = rows(&[("b", 5), ("a", 5), ("c", 9), ("d", 1), ("e", 2)]);
    assert_eq!(
        bounded_topics(all.clone(), 3),
        rows(&[("c", 9), ("a", 5), ("b", 5), ("_other", 3)])
    );
    // Stable whatever the order the directory gives them in.
    let mut reversed = all.clone();
    reversed.reverse();
    assert_eq!(bounded_topics(reversed, 3), bounded_topics(all.clone(), 3));
    assert_eq!(bounded_topics(all.clone(), 0), rows(&[("_other", 22)]));
    assert_eq!(
        bounded_topics(all.clone(), 10),
        rows(&[
            ("c", 9),
            ("a", 5),
            ("b", 5),
            ("e", 2),
            ("d", 1),
            ("_other", 0)
        ])
    );
    assert_eq!(bounded_topics(Vec::new(), 20), rows(&[("_other", 0)]));
}

/// A topic named `_other` is summed into the `_other` sample, never a second label.
#[test]
fn a_topic_named_other_does_not_repeat_the_label() {
    let all = rows(&[("_other", 7), ("x", 1)]);
    assert_eq!(bounded_topics(all, 5), rows(&[("x", 1), ("_other", 7)]));
}

#[test]
fn a_hub_without_a_server_shows_the_default_number_of_topics() {
    let hub = Hub::default();
    assert_eq!(hub.metrics_topics(), DEFAULT_METRICS_TOPICS);
    hub.set_metrics_topics(3);
    assert_eq!(hub.metrics_topics(), 3);
}

/// A `ringsocket.v1` subscription on a core that has not yet delivered what is in its
/// inbox: recovery from the history stops at what the core delivered, the rest comes
/// through the inbox, and a client that heard more elsewhere resumes at its own offset.
#[test]
fn v1_recovery_stops_at_what_the_core_delivered() {
    on_a_core(64 << 20, Duration::from_millis(16), async |hub| {
        let publisher = Publisher::new(hub.clone());
        for i in 1..=3 {
            publisher.publish_text("t", i.to_string()).unwrap();
        }
        let epoch = hub
            .history_page("t", 0, 0)
            .position
            .unwrap()
            .epoch
            .to_string();
        // Nothing delivered on this core yet: 1..3 wait in its inbox.
        let ahead = session();
        let since = Since {
            offset: 3,
            epoch: epoch.clone(),
        };
        let s = subscribe_v1(&ahead, "t", Some(&since), None, |_| {
            Message::Text("reply".into())
        })
        .unwrap();
        assert!(s.recovered);
        assert_eq!(
            (s.position.offset, s.missed),
            (3, 0),
            "resumes at its since"
        );
        let behind = session();
        let since = Since { offset: 0, epoch };
        let s = subscribe_v1(&behind, "t", Some(&since), None, |_| {
            Message::Text("reply".into())
        })
        .unwrap();
        assert!(s.recovered);
        assert_eq!(
            (s.position.offset, s.missed),
            (0, 0),
            "the inbox brings 1..3"
        );
        tokio::task::yield_now().await;
        let offsets = |texts: Vec<String>| -> Vec<u64> {
            texts
                .iter()
                .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .filter_map(|v| v["offset"].as_u64())
                .collect()
        };
        assert_eq!(offsets(take_texts(&behind)), [1, 2, 3]);
        // Now delivered here: a late subscriber gets them from the history.
        let late = session();
        let since = Since {
            offset: 1,
            epoch: hub
                .history_page("t", 0, 0)
                .position
                .unwrap()
                .epoch
                .to_string(),
        };
        let s = subscribe_v1(&late, "t", Some(&since), None, |_| {
            Message::Text("{}".into())
        })
        .unwrap();
        assert_eq!((s.position.offset, s.missed), (3, 2));
        assert_eq!(offsets(take_texts(&late)), [2, 3]);
    });
}

fn v1_offsets(texts: Vec<String>) -> Vec<(u64, String)> {
    texts
        .iter()
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .filter(|v| v["type"] == "pub")
        .map(|v| (v["offset"].as_u64().unwrap(), v["data"].to_string()))
        .collect()
}

/// A conflated window goes out in the order of each key's latest value: a v1 client,
/// which drops an offset below the last one it has, loses no key's latest value.
#[test]
fn a_conflated_window_goes_out_in_offset_order() {
    on_a_core(64 << 20, Duration::from_millis(20), async |_hub| {
        let (viewer, sender) = (session(), session());
        subscribe_v1(&viewer, "c", None, None, |_| Message::Text("{}".into())).unwrap();
        let _ = take_texts(&viewer);
        publish_keyed(&sender, "a", "1");
        publish_keyed(&sender, "a", "2");
        publish_keyed(&sender, "b", "3");
        publish_keyed(&sender, "a", "4");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let got = v1_offsets(take_texts(&viewer));
        assert_eq!(
            got,
            [
                (1, "1".to_owned()),
                (3, "3".to_owned()),
                (4, "4".to_owned())
            ]
        );
    });
}

/// A publication dropped for a full inbox does not send every later one of the
/// publishing core through its inbox: once the core has delivered what was queued to
/// it, a session's own publish is delivered at once again.
#[test]
fn a_dropped_publication_does_not_stall_the_cores_own_ones() {
    on_a_core_with(
        Hub::new(1),
        64 << 20,
        Duration::from_millis(16),
        async |hub| {
            let viewer = session();
            subscribe(&viewer, "t").unwrap();
            let publisher = Publisher::new(hub.clone());
            publisher.publish_text("t", "1").unwrap();
            // The inbox holds one: this one is dropped for this core (counted).
            publisher.publish_text("t", "2").unwrap();
            assert_eq!(hub.metrics.inbox_dropped.load(Ordering::Relaxed), 1);
            tokio::task::yield_now().await;
            assert_eq!(take_texts(&viewer), ["1"]);
            let sender = session();
            publish_from_session(&sender, "t", &Message::Text("3".into()), None, true).unwrap();
            assert_eq!(take_texts(&viewer), ["3"], "delivered at once, not queued");
        },
    );
}
