-- Claims of a queue with a queue-wide limit (max_running, rate_per_second,
-- retry_rate_per_second) used to decide one at a time, each waiting for the
-- one before it to commit, even with the limit far away. While it is far away
-- they now decide in one of a few claim lanes at once (limits.sql), and a lane
-- spends the queue's rate tokens on its own row here rather than the bucket's
-- one row in flow_buckets, which every claim would otherwise wait on. A queue
-- bucket holds its flow_buckets tokens less what its lanes spent since; a
-- claim that decides alone (holding every lane) folds the lanes' spending back
-- into the bucket.
CREATE TABLE ledgerq.flow_lane_spends (
    queue  text             NOT NULL,
    bucket text             NOT NULL,
    lane   integer          NOT NULL,
    spent  double precision NOT NULL,
    PRIMARY KEY (queue, bucket, lane),
    CONSTRAINT flow_lane_spends_kind_valid CHECK (bucket IN ('queue', 'retry'))
);
