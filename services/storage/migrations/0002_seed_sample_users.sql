-- Sample users for the demo, tests and benchmarks: u00001 .. u01000.
-- u00951 .. u01000 are test users (the processor drops their events by rule);
-- tiers cycle free (60%), pro (30%), enterprise (10%).
INSERT INTO users (id, name, tier, is_test)
SELECT format('u%s', lpad(n::text, 5, '0')),
       format('Sample User %s', n),
       CASE WHEN n % 10 < 6 THEN 'free' WHEN n % 10 < 9 THEN 'pro' ELSE 'enterprise' END,
       n > 950
FROM generate_series(1, 1000) AS n
ON CONFLICT (id) DO NOTHING;
