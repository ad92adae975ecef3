//! Stream retention.

use crate::fixtures::{T0, command, enroll};
use crate::harness::{Harness, conformance};

conformance!(pruning_keeps_the_newest_signals_and_moves_the_floor);

async fn pruning_keeps_the_newest_signals_and_moves_the_floor(h: &Harness) {
    let store = h.store();
    let agent = enroll(store, &[]).await;
    let idle = enroll(store, &[]).await;
    for i in 0..5 {
        command(store, agent, 10, T0 + i * 1000).await;
    }
    // Keep the newest 3: signals 1 and 2 go, the floor becomes 2.
    let moved = store.prune_signals(T0 - 1, 3, T0 + 10_000).await.expect("prune");
    assert_eq!(moved, vec![(agent, 2)]);
    let left: Vec<u64> = store.read_signals(agent, 0, 100).await.expect("read").iter().map(|(s, _)| *s).collect();
    assert_eq!(left, [3, 4, 5]);
    // By age: everything older than T0 + 3.5 s goes (seq 4 has ts T0 + 3 s).
    let moved = store.prune_signals(T0 + 3_500, 10_000, T0 + 20_000).await.expect("prune");
    assert_eq!(moved, vec![(agent, 4)]);
    // Nothing more to do: no floors move.
    assert!(store.prune_signals(T0 + 3_500, 10_000, T0 + 30_000).await.expect("prune").is_empty());
    assert_eq!(store.get_agent(agent).await.expect("get").expect("agent").floor_seq, 4);
    let changed: Vec<_> =
        store.stream_changes(T0 + 20_000).await.expect("changes").into_iter().map(|c| c.agent_id).collect();
    assert_eq!(changed, vec![agent], "a moved floor is a stream change; {idle} did not move");
}
