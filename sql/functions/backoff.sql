-- Exponential backoff: base * 2^(attempt-1), capped at max_seconds; with full
-- jitter the delay is drawn uniformly from [0, that], which spreads a thundering
-- herd of retries instead of synchronising it.
CREATE OR REPLACE FUNCTION ledgerq.compute_backoff(
    attempt integer,
    base_seconds double precision DEFAULT 1,
    max_seconds double precision DEFAULT 3600,
    jitter boolean DEFAULT true
) RETURNS interval
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
DECLARE
    -- About 100 years: a larger cap ('Infinity' included, meaning none) would
    -- overflow make_interval into a negative delay, i.e. a retry due at once.
    longest_s constant double precision := 3153600000;
    cap_s double precision;
    remaining integer;
    ceiling_s double precision;
BEGIN
    IF attempt IS NULL OR attempt < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = format('compute_backoff: attempt must be >= 1, got %s', coalesce(attempt::text, 'NULL'));
    END IF;
    IF base_seconds IS NULL OR base_seconds < 0 OR max_seconds IS NULL OR max_seconds < 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'LQ422',
            MESSAGE = 'compute_backoff: base_seconds and max_seconds must be >= 0';
    END IF;
    -- base * 2^(attempt-1) in one go overflows double precision for a large
    -- base or attempt: double in steps of at most 2^62 until the cap instead
    -- (exact: multiplying by a power of two never rounds). One step, usually.
    cap_s := least(max_seconds, longest_s);
    ceiling_s := least(base_seconds, cap_s);
    remaining := attempt - 1;
    WHILE remaining > 0 AND ceiling_s > 0 AND ceiling_s < cap_s LOOP
        ceiling_s := least(cap_s, ceiling_s * power(2::double precision, least(remaining, 62)));
        remaining := remaining - 62;
    END LOOP;
    IF coalesce(jitter, true) THEN
        ceiling_s := random() * ceiling_s;
    END IF;
    RETURN make_interval(secs => ceiling_s);
END;
$$;
