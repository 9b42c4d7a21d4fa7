"""Run by tests/test_ray_transport.py in a fresh process: shared ArrayRecords through Ray.

Starts a private 1-CPU Ray instance on 127.0.0.1 (temp dir: argv[1]), sends one shared
global model in two messages to an actor and gets a shared reply back; prints one JSON
object with what each side saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listen on 127.0.0.1 only
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from precode_flower.strategies import ray_transport  # noqa: E402
from precode_flower.strategies.arrays import StoredArray, arrays_view, to_array_record  # noqa: E402
from precode_flower.strategies.ray_transport import (  # noqa: E402
    SharedArrayRecord,
    share_arrays,
    share_message_arrays,
)

ARRAYS = {
    "w": np.arange(12 * 1024, dtype=np.float32).reshape(96, 128),
    "b": np.array([1, -2, 3], dtype=np.int64),
    "step": np.array(7.5, dtype=np.float64),  # 0-d
}


def digest(record: ArrayRecord) -> dict[str, list]:
    return {
        k: [str(v.dtype), list(v.shape), float(v.sum())] for k, v in arrays_view(record).items()
    }


@ray.remote(num_cpus=1)
class Client:
    def __init__(self) -> None:
        self.reads: list[str] = []  # the objects this actor read from the store
        get = ray.get

        def counting_get(ref, *args, **kwargs):
            self.reads.append(ref.hex())
            return get(ref, *args, **kwargs)

        ray.get = counting_get

    def handle(self, msg: Message) -> tuple[str, dict, bool, Message]:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 2, 1
        record = msg.content["arrays"]
        views = all(isinstance(a, StoredArray) and not a.values().flags.writeable
                    for a in record.values())  # fmt: skip
        update = {k: v * 2 for k, v in arrays_view(record).items()}
        reply = Message(RecordDict({"arrays": share_arrays(update)}), reply_to=msg)
        return type(record).__name__, digest(record), views, reply

    def reads_of(self, ref_hex: str) -> int:
        return self.reads.count(ref_hex)


def main() -> None:
    ray.init(
        num_cpus=1,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=sys.argv[1],
        object_store_memory=80 << 20,
        logging_level="ERROR",
        log_to_driver=False,
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    try:
        record = to_array_record(ARRAYS)
        content = RecordDict({"arrays": record, "config": ConfigRecord({"x": 1})})
        messages = [Message(content, dst_node_id=n, message_type="train") for n in (5, 6)]
        sent = share_message_arrays(messages)
        shared = sent[0].content["arrays"]
        client = Client.remote()
        seen = [ray.get(client.handle.remote(m)) for m in sent]
        model_reads = ray.get(client.reads_of.remote(shared.__dict__["_shared_ref"].hex()))
        reply = seen[0][3].content["arrays"]
        # The reply's values stay readable after the actor that put them has gone, and
        # after the store has been filled since.
        ray.kill(client)
        filler = [ray.put(np.zeros(4 << 20, np.float32)) for _ in range(6)]
        del filler
        changed = SharedArrayRecord(dict(record.items()))
        changed["b"] = record["b"]
        out = {
            "shared_type": type(shared).__name__,
            "same_record_in_both": shared is sent[1].content["arrays"],
            "original_untouched": type(record).__name__,
            "actor_types": [s[0] for s in seen],
            "actor_digests": [s[1] for s in seen],
            "expected_digest": digest(record),
            "actor_views": [s[2] for s in seen],
            "actor_model_reads": model_reads,
            "reply_type": type(reply).__name__,
            "reply_views": all(isinstance(a, StoredArray) for a in reply.values()),
            "reply_digest": digest(reply),
            "reply_equal": reply == to_array_record({k: v * 2 for k, v in ARRAYS.items()}),
            # Only the broadcast model is kept by its readers; this process read two
            # replies (single readers) and nothing else.
            "driver_cache_entries": len(ray_transport._READ_CACHE),
            "expected_reply": digest(to_array_record({k: v * 2 for k, v in ARRAYS.items()})),
            "changed_pickles_plain": changed.__reduce__()[0].__name__,
        }
    finally:
        ray.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
