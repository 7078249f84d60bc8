//! Property tests of the codecs: whatever bytes arrive, decoding answers `Ok` or an error,
//! never panics; everything we encode decodes to the same value; a damaged snapshot file is
//! always refused.

use proptest::prelude::*;
use waft::pb;
use waft::types::{ClientSeq, Request, ServiceDigest, ServiceLimits, StateDigest, TypeConfig};

fn message(payload: Vec<u8>) -> pb::raft::RaftMessage {
    pb::raft::RaftMessage {
        format: pb::FORMAT_POSTCARD,
        payload,
    }
}

fn request() -> impl Strategy<Value = Request> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
    let name = || "[a-z]{0,12}";
    prop_oneof![
        (
            name(),
            bytes(),
            proptest::option::of((any::<u64>(), any::<u64>())),
            any::<u64>()
        )
            .prop_map(
                |(service, payload, client, timestamp_ms)| Request::Command {
                    service,
                    payload,
                    client: client.map(|(client_id, seq)| ClientSeq { client_id, seq }),
                    timestamp_ms,
                }
            ),
        (
            name(),
            bytes(),
            name(),
            proptest::option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(
                |(service, module, engine, fuel, timestamp_ms)| Request::Deploy {
                    service,
                    module,
                    engine,
                    limits: ServiceLimits {
                        fuel_per_apply: fuel,
                        max_memory_bytes: None,
                    },
                    timestamp_ms,
                }
            ),
        (
            name(),
            name(),
            any::<u64>(),
            proptest::option::of(name()),
            any::<u64>()
        )
            .prop_map(|(service, module, size, findings, timestamp_ms)| {
                Request::DeployStored {
                    service,
                    module,
                    size,
                    engine: String::new(),
                    limits: ServiceLimits::default(),
                    timestamp_ms,
                    findings,
                }
            }),
        (name(), proptest::option::of(any::<u32>()), any::<u64>()).prop_map(
            |(service, to, timestamp_ms)| Request::Rollback {
                service,
                to,
                timestamp_ms
            }
        ),
        any::<u64>().prop_map(|timestamp_ms| Request::Audit { timestamp_ms }),
        (any::<u64>(), name(), any::<u32>(), name()).prop_map(|(index, n, version, s)| {
            Request::AuditReport {
                digest: StateDigest {
                    index,
                    services: vec![ServiceDigest {
                        name: n,
                        version,
                        module: s.clone(),
                        state: s,
                        state_len: index,
                    }],
                    sessions: String::new(),
                },
            }
        }),
        (any::<u64>(), any::<u64>(), name(), any::<u32>()).prop_map(|(index, node, n, version)| {
            Request::AuditVotes {
                index,
                proposer: node,
                votes: vec![(
                    node,
                    StateDigest {
                        index,
                        services: vec![ServiceDigest {
                            name: n.clone(),
                            version,
                            module: n.clone(),
                            state: n,
                            state_len: index,
                        }],
                        sessions: String::new(),
                    },
                )],
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn raft_messages_decode_or_refuse_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let m = message(payload);
        let _ = pb::decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&m);
        let _ = pb::decode::<openraft::raft::VoteRequest<TypeConfig>>(&m);
        let _ = pb::decode::<openraft::raft::VoteResponse<TypeConfig>>(&m);
        let _ = pb::decode::<openraft::raft::TransferLeaderRequest<TypeConfig>>(&m);
        let _ = pb::decode::<openraft::raft::StreamAppendResult<TypeConfig>>(&m);
        let _ = pb::decode::<openraft::raft::SnapshotResponse<TypeConfig>>(&m);
        let _ = pb::decode::<(waft::types::Vote, waft::types::SnapshotMeta)>(&m);
        let _ = pb::decode::<waft::types::Entry>(&m);
        let _ = pb::decode::<waft::runtime::ReplayForm>(&m);
    }

    #[test]
    fn every_request_survives_the_wire(r in request()) {
        let wire = pb::encode(&r).expect("encode");
        let back: Request = pb::decode(&wire).expect("decode");
        prop_assert_eq!(back, r);
    }

    #[test]
    fn a_message_in_another_encoding_is_refused(format in 2u32.., payload in proptest::collection::vec(any::<u8>(), 0..16)) {
        let m = pb::raft::RaftMessage { format, payload };
        let e = pb::decode::<Request>(&m).expect_err("other encoding");
        prop_assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_truncated_or_flipped_snapshot_file_is_refused(cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0u8..8, truncate in any::<bool>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.snap");
        let header = waft::storage::snapshot::SnapshotHeader {
            meta: Default::default(),
            last_timestamp_ms: 7,
            engine: "e".into(),
            sessions: vec![],
            modules: vec![("m".into(), 5)],
            services: vec![],
            cluster_version: 1,
        };
        waft::storage::snapshot::write(&path, &header, &[b"hello"], &[]).expect("write");
        let mut bytes = std::fs::read(&path).expect("read");
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        } else {
            let i = flip.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        std::fs::write(&path, &bytes).expect("write damaged");
        let file = std::fs::File::open(&path).expect("open");
        prop_assert!(waft::storage::snapshot::Reader::open(file).is_err());
    }

    #[test]
    fn arbitrary_files_are_not_snapshots(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.snap");
        std::fs::write(&path, &bytes).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        prop_assert!(waft::storage::snapshot::Reader::open(file).is_err());
    }
}
