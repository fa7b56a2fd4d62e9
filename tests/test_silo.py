import pytest

from fgl_client.silo import load_silo
from fgl_core.config import RunConfig


def test_simulated_silos_split_the_shared_dataset(blood_npz):
    cfg = RunConfig.from_flower(
        {"dataset": str(blood_npz), "train-subset": 1000, "eval-subset": 300}
    )
    silos = [load_silo(cfg, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert sum(len(s.train) for s in silos) == 1000
    assert sum(len(s.test) for s in silos) == 300
    assert silos[0].class_names[0] == "basophil" and silos[1].name == "partition 1/3"


def test_node_local_data_path_is_the_silos_own_dataset(retina_npz, blood_npz):
    cfg = RunConfig.from_flower({"dataset": str(blood_npz)})
    silo = load_silo(cfg, {"data-path": str(retina_npz), "partition-id": 0, "num-partitions": 2})
    assert silo.name == str(retina_npz) and silo.num_classes == 5
    assert len(silo.test) == 400


def test_node_config_without_data_says_what_it_needs():
    with pytest.raises(ValueError, match=r"'data-path'.*'partition-id' and 'num-partitions'"):
        load_silo(RunConfig(), {"something": 1})


def test_a_silo_tells_the_server_only_that_its_data_is_not_usable(tmp_path, caplog):
    from fgl_client.silo import SiloDataUnusable, open_silo

    cfg = RunConfig.from_flower({})
    missing, broken = tmp_path / "nope.npz", tmp_path / "junk.npz"
    broken.write_bytes(b"junk")
    replies = []
    for path in (missing, broken):
        with pytest.raises(SiloDataUnusable) as err:
            open_silo(cfg, {"data-path": str(path)})
        replies.append(str(err.value).replace(path.name, "X"))
    assert replies[0] == replies[1]  # existence is not told apart
    assert "does not exist" in caplog.text and "not a readable .npz" in caplog.text


def test_a_silo_tells_the_server_only_that_a_named_model_cannot_be_loaded(
    tmp_path, breast_npz, capfd, caplog, task_identity
):
    """The generator's path is the server's choice: the reply must not say whether it exists on
    the silo (a missing directory and an empty one read the same), only which model it named."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fgl_client.handlers import SiloModelUnusable, adapt, embed
    from fgl_core.payload import REQUEST_RECORD, EmbedRequest

    missing, empty = tmp_path / "no-such-model", tmp_path / "empty-model"
    empty.mkdir()
    replies = []
    for handler in (embed, adapt):  # round 0, and a round of adapting the generator
        for path in (missing, empty):
            run_config = {"generator": str(path), "cache-dir": str(tmp_path / "cache"),
                          "strategy": "fgl", "generator-adaptation": "lora"}  # fmt: skip
            request = EmbedRequest.from_config(RunConfig.from_flower(run_config)).to_record()
            content = RecordDict({REQUEST_RECORD: request})
            if handler is adapt:
                content = RecordDict({"arrays": ArrayRecord(),
                                      "config": ConfigRecord({"server-round": 1})})  # fmt: skip
            msg = Message(content=content, dst_node_id=1, message_type="query.x")
            context = Context(
                run_id=1,
                node_id=1,
                node_config={"data-path": str(breast_npz)},
                state=RecordDict(),
                run_config=run_config,
            )
            with pytest.raises(SiloModelUnusable) as err:
                handler(msg, context)
            replies.append(str(err.value).replace(path.name, "X"))
    assert replies[0] == replies[1] and replies[2] == replies[3]  # existence is not told apart
    assert all("generator" in r and "the silo's log says why" in r for r in replies)
    # the handler logs as a ClientApp does: to stderr, or where logging is already configured
    log = capfd.readouterr().err + caplog.text
    assert "no such directory" in log and "could not be loaded from it" in log
