//! Unit tests of the chunk cache: single flight, damage, budgets.

use super::*;

#[tokio::test]
async fn single_flight_and_damage_detection() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskChunks::open(dir.path()).unwrap());
    let cache = Arc::new(Cache::new(store.clone(), 2));
    let data = b"chunk bytes".to_vec();
    let digest = crate::digest::sha256(&data);
    let calls = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (cache, calls, data, digest) =
                (cache.clone(), calls.clone(), data.clone(), digest.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(&digest, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Ok(data)
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(*t.await.unwrap(), b"chunk bytes");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one fetch for eight readers"
    );

    // A damaged file on disk is dropped, not served.
    let fresh = Cache::new(store.clone(), 2);
    std::fs::write(
        dir.path().join("cache/chunks").join(digest.digest()),
        b"chunk bytez",
    )
    .unwrap();
    assert!(fresh.lookup(&digest).unwrap().is_none());
    assert!(!store.contains(&digest));
    assert_eq!(fresh.stats.corrupt_dropped.load(Ordering::Relaxed), 1);
    // A temp file left by a crash is never looked at as a chunk.
    std::fs::write(dir.path().join("tmp/.tmpXYZ"), b"partial").unwrap();
    assert!(fresh.lookup(&digest).unwrap().is_none());
}

#[test]
fn a_range_is_read_from_disk_only_once_the_chunk_file_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskChunks::open(dir.path()).unwrap());
    let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let digest = crate::digest::sha256(&data);
    let file = dir.path().join("cache/chunks").join(digest.digest());
    store.put(&digest, &data).unwrap();

    // A fresh process (cache) has not verified the file: no range read, a full load.
    let cache = Cache::new(store.clone(), 1).with_memory_budget(0);
    assert!(cache.read_range(&digest, 4096, 100..200).unwrap().is_none());
    assert!(cache.lookup(&digest).unwrap().is_some());
    // The memory LRU keeps the newest chunk; push it out with another.
    let other = vec![7u8; 10];
    cache
        .insert(&crate::digest::sha256(&other), Arc::new(other))
        .unwrap();
    assert!(!cache.in_memory(&digest));
    let hits = cache.stats.disk_hits.load(Ordering::Relaxed);
    assert_eq!(
        cache.read_range(&digest, 4096, 100..200).unwrap().unwrap(),
        &data[100..200]
    );
    assert_eq!(cache.stats.disk_hits.load(Ordering::Relaxed), hits + 1);
    // The index's length must match what was verified.
    assert!(cache.read_range(&digest, 4000, 100..200).unwrap().is_none());

    // A file found short is verified again (and dropped) on its next load.
    std::fs::write(&file, &data[..1000]).unwrap();
    assert!(cache
        .read_range(&digest, 4096, 3000..3100)
        .unwrap()
        .is_none());
    assert!(cache.read_range(&digest, 4096, 0..10).unwrap().is_none());
    assert!(cache.lookup(&digest).unwrap().is_none());
    assert!(!store.contains(&digest));
}

#[test]
fn memory_keeps_to_its_byte_budget_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskChunks::open(dir.path()).unwrap());
    let cache = Cache::new(store, 64).with_memory_budget(2500);
    let chunks: Vec<(Digest, Arc<Vec<u8>>)> = (0..4u8)
        .map(|i| {
            let data = vec![i; 1000];
            (crate::digest::sha256(&data), Arc::new(data))
        })
        .collect();
    for (d, data) in &chunks {
        cache.insert(d, data.clone()).unwrap();
    }
    let memory = cache.memory.lock().unwrap();
    assert_eq!(memory.bytes, 2000);
    assert!(!memory.contains(&chunks[0].0) && !memory.contains(&chunks[1].0));
    assert!(memory.contains(&chunks[2].0) && memory.contains(&chunks[3].0));
    drop(memory);
    // Evicted from memory, still on disk.
    assert!(cache.contains(&chunks[0].0));
}

#[tokio::test]
async fn callers_waiting_for_a_failed_fetch_get_its_error_without_fetching() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskChunks::open(dir.path()).unwrap());
    let cache = Arc::new(Cache::new(store, 2));
    let digest = crate::digest::sha256(b"never fetched");
    let calls = Arc::new(AtomicU64::new(0));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (cache, calls, digest) = (cache.clone(), calls.clone(), digest.clone());
        tokio::spawn(async move {
            cache
                .get_or_fetch(&digest, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    started_tx.send(()).unwrap();
                    fail_rx.await.unwrap();
                    Err(CacheError::Read("registry answered 500".into()))
                })
                .await
        })
    };
    started_rx.await.unwrap();
    // Seven callers queue behind the fetch under way, then it fails.
    let waiters: Vec<_> = (0..7)
        .map(|_| {
            let (cache, calls, digest) = (cache.clone(), calls.clone(), digest.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(&digest, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok(b"fetched again".to_vec())
                    })
                    .await
            })
        })
        .collect();
    // Each holds the flight (the map and the first caller hold the other two references).
    while Arc::strong_count(&cache.flights.lock().unwrap()[&digest]) < 9 {
        tokio::task::yield_now().await;
    }
    fail_tx.send(()).unwrap();
    let e = first.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
    for w in waiters {
        let got = w.await.unwrap();
        match got {
            Err(e) => assert!(e.to_string().contains("500"), "{e}"),
            Ok(d) => panic!("a waiter fetched again: {:?}", String::from_utf8_lossy(&d)),
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one fetch for eight callers"
    );

    // A caller after the failure fetches afresh.
    let got = cache
        .get_or_fetch(&digest, || async { Ok(b"never fetched".to_vec()) })
        .await
        .unwrap();
    assert_eq!(*got, b"never fetched");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
