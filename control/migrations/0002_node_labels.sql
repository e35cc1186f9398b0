-- Outpost control plane, schema version 2.
--
-- An index of every node's effective labels (its own from its last heartbeat, the operator's
-- winning), each as the text `key=value`, so a node listing filtered by a selector with a
-- `key=value` term reads only the nodes that carry it instead of every node. The binary writes
-- the column with each node record. NULL means not known: a row written before this version (or
-- by a replica not yet upgraded), or labels that text cannot hold (NUL); such a node is read by
-- every filtered listing and judged from its record, so it is never missed. Each node's next
-- heartbeat fills its row in.
ALTER TABLE nodes ADD COLUMN labels text[];
CREATE INDEX nodes_by_label ON nodes USING gin (labels);
CREATE INDEX nodes_unindexed_labels ON nodes (node_id) WHERE labels IS NULL;

-- The sequence number of a node's service change not yet acknowledged (0: none), so a replica's
-- periodic re-check of its held polls reads one column, not the record. NULL: not known (written
-- before this version); the re-check then reads the record.
ALTER TABLE node_services ADD COLUMN pending_seq bigint;
