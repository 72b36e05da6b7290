//! The named recordings of [`Metrics`]: every place the pipeline counts, times or reports
//! something calls one of these, so a metric's name, labels and meaning live in one place.

use prometheus::Histogram;

use super::Metrics;

/// Producer: fetching sources and publishing their records.
impl Metrics {
    /// Starts every per-source series of `source` at 0 (configured sources call this).
    pub fn init_source(&self, source: &str) {
        self.records_fetched.with_label_values(&[source]);
        self.records_published.with_label_values(&[source]);
        self.publish_failures.with_label_values(&[source]);
        self.invalid_records.with_label_values(&[source]);
        self.poll_duration.with_label_values(&[source]);
        self.poll_failures.with_label_values(&[source]);
        self.http_retries.with_label_values(&["producer", source]);
        self.http_duration.with_label_values(&["producer", source]);
    }

    /// `n` records fetched from `source`'s API.
    pub fn fetched(&self, source: &str, n: u64) {
        self.records_fetched.with_label_values(&[source]).inc_by(n);
    }

    /// `n` records of `source` acknowledged by Kafka.
    pub fn published(&self, source: &str, n: u64) {
        self.records_published
            .with_label_values(&[source])
            .inc_by(n);
    }

    /// `n` records of `source` Kafka did not acknowledge (the poll is repeated).
    pub fn publish_failed(&self, source: &str, n: u64) {
        self.publish_failures.with_label_values(&[source]).inc_by(n);
    }

    /// A record of `source` failed parsing or validation (it is dead-lettered).
    pub fn invalid_record(&self, source: &str) {
        self.invalid_records.with_label_values(&[source]).inc();
    }

    /// A poll of `source` took `seconds`.
    pub fn poll_took(&self, source: &str, seconds: f64) {
        self.poll_duration
            .with_label_values(&[source])
            .observe(seconds);
    }

    /// A poll of `source` failed (it is repeated next interval).
    pub fn poll_failed(&self, source: &str) {
        self.poll_failures.with_label_values(&[source]).inc();
    }
}

/// HTTP calls of either role (`component` is `producer` or `consumer`, `target` the API).
impl Metrics {
    /// A request to `target` is retried.
    pub fn http_retried(&self, component: &str, target: &str) {
        self.http_retries
            .with_label_values(&[component, target])
            .inc();
    }

    /// A request to `target` took `seconds`.
    pub fn http_took(&self, component: &str, target: &str, seconds: f64) {
        self.http_duration
            .with_label_values(&[component, target])
            .observe(seconds);
    }
}

/// Dead letters of either role.
impl Metrics {
    /// A record of `stage` was written to the DLQ by `component`.
    pub fn dead_lettered(&self, component: &str, stage: &str) {
        self.dlq_records
            .with_label_values(&[component, stage])
            .inc();
    }

    /// Kafka refused a DLQ record of `component` (retried; the source offset is held).
    pub fn dlq_write_failed(&self, component: &str) {
        self.dlq_write_failures
            .with_label_values(&[component])
            .inc();
    }
}

/// Consumer: batches, the join, Redis and delivery.
impl Metrics {
    /// Starts the consumer's per-topic and DLQ series at 0.
    pub fn init_consumer(&self, topics: &[&str]) {
        for topic in topics {
            self.messages_consumed.with_label_values(&[topic]);
        }
        self.dlq_write_failures.with_label_values(&["consumer"]);
    }

    /// `n` messages of `topic` fully processed (their offsets stored).
    pub fn consumed(&self, topic: &str, n: u64) {
        self.messages_consumed.with_label_values(&[topic]).inc_by(n);
    }

    /// A batch took `seconds`, from its first message to its offsets stored.
    pub fn batch_took(&self, seconds: f64) {
        self.batch_duration
            .with_label_values(&[] as &[&str])
            .observe(seconds);
    }

    /// A batch's join emitted `merged` views and wrote `states` join states.
    pub fn joined(&self, merged: u64, states: u64) {
        self.records_merged.inc_by(merged);
        self.join_states_written.inc_by(states);
    }

    /// A side's topic-partition ran ahead of the other's and was paused.
    pub fn side_paused(&self) {
        self.sides_paused.inc();
    }

    /// `n` views were already delivered (by another worker or an earlier attempt): not sent.
    pub fn duplicates_skipped(&self, n: u64) {
        self.duplicates_skipped.inc_by(n);
    }

    /// Analytics acknowledged `n` records (accepted or known duplicates).
    pub fn delivered(&self, n: u64) {
        self.records_delivered.inc_by(n);
    }

    /// Whether delivery is held (Analytics unavailable or refusing the credentials).
    pub fn delivery_halted(&self, halted: bool) {
        self.delivery_halted.set(i64::from(halted));
    }

    /// The histogram a Redis operation `op` (`load`, `commit`, `confirm`) is timed into.
    pub fn redis_timer(&self, op: &str) -> Histogram {
        self.redis_duration.with_label_values(&[op])
    }
}

/// Consumer: group membership and liveness.
impl Metrics {
    /// The lag of a topic-partition this member holds.
    pub fn lag(&self, topic: &str, partition: i32, messages: i64) {
        self.consumer_lag
            .with_label_values(&[topic, &partition.to_string()])
            .set(messages);
    }

    /// Drops the lag series of a topic-partition this member no longer holds (its new owner
    /// reports it; a value kept here would never return to 0).
    pub fn lag_forgotten(&self, topic: &str, partition: i32) {
        let _ = self
            .consumer_lag
            .remove_label_values(&[topic, &partition.to_string()]);
    }

    /// The member holds `n` topic-partitions.
    pub fn assigned(&self, n: usize) {
        self.assigned_partitions.set(n as i64);
    }

    /// Seconds since the worker last polled Kafka (0 while it waits in a poll).
    pub fn since_poll(&self, seconds: u64) {
        self.seconds_since_poll.set(seconds as i64);
    }
}
