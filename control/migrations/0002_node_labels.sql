-- Outpost control plane, schema version 2.
--
-- An index of every node's effective labels (its own from its last heartbeat, the operator's
-- winning), each as the text `key=value`, so a node listing filtered by a selector with a
-- `key=value` term reads only the nodes that carry it instead of every node. The binary writes
-- the column with each node record. NULL means not known: labels that text cannot hold (NUL);
-- such a node is read by every filtered listing and judged from its record, so it is never
-- missed. A replica still on the old binary leaves the column as it was when it writes a node
-- (docs/scaling.md, "Upgrading to schema 2").
ALTER TABLE nodes ADD COLUMN labels text[];
CREATE INDEX nodes_by_label ON nodes USING gin (labels);
CREATE INDEX nodes_unindexed_labels ON nodes (node_id) WHERE labels IS NULL;
-- The rows already there are filled in from their records (as the binary computes it), but for
-- a record holding the NUL character anywhere: its JSON cannot be taken apart as text, so its
-- row stays NULL until the binary writes it.
UPDATE nodes SET labels = ARRAY(
    SELECT own.key || '=' || own.value
    FROM json_each_text(CASE WHEN json_typeof(doc->'last_heartbeat'->'labels') = 'object'
                             THEN doc->'last_heartbeat'->'labels' ELSE '{}'::json END) own
    WHERE NOT EXISTS (
        SELECT 1 FROM json_object_keys(CASE WHEN json_typeof(doc->'operator_labels') = 'object'
                                            THEN doc->'operator_labels' ELSE '{}'::json END) op
        WHERE op = own.key)
    UNION ALL
    SELECT op.key || '=' || op.value
    FROM json_each_text(CASE WHEN json_typeof(doc->'operator_labels') = 'object'
                             THEN doc->'operator_labels' ELSE '{}'::json END) op
)
WHERE strpos(doc::text, '\u0000') = 0;

-- The sequence number of a node's service change not yet acknowledged (0: none), so a replica's
-- periodic re-check of its held polls reads one column, not the record. NULL: not known (a
-- record holding NUL); the re-check then reads the record.
ALTER TABLE node_services ADD COLUMN pending_seq bigint;
UPDATE node_services SET pending_seq = CASE
        WHEN json_typeof(doc->'desired') = 'object'
         AND (doc->'desired'->>'seq')::bigint > COALESCE((doc->>'acked_seq')::bigint, 0)
        THEN (doc->'desired'->>'seq')::bigint
        ELSE 0 END
WHERE strpos(doc::text, '\u0000') = 0;
