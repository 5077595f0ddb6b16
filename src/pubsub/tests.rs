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

#[test]
fn frames_split_back_into_kind_and_payload_for_the_broker() {
    for len in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
        let payload = vec![0xa5u8; len];
        let frame = encode_message(&Message::Binary(Bytes::from(payload.clone())));
        assert_eq!(split_frame(&frame), (Kind::Binary, Bytes::from(payload)));
    }
    let frame = encode_message(&Message::Text("héllo".into()));
    assert_eq!(split_frame(&frame), (Kind::Text, Bytes::from("héllo")));
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
    sink(Inbound {
        topic: "t".into(),
        kind: Kind::Text,
        payload: Bytes::from_static(b"hi"),
    });
    for rx in &mut receivers {
        let delivery = rx.try_recv().unwrap();
        assert_eq!(&*delivery.topic, "t");
        assert_eq!(&delivery.frame[..], b"\x81\x02hi");
    }
}
