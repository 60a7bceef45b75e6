#!/usr/bin/env python3
"""A party written in Python, speaking to the aggregation server with stubs generated from proto/.

It plays both roles for one party: as the admin it creates a job whose rate and method are read from the
.dppa file's header; as the party it uploads that file record by record; then it watches the job until it
merges and downloads the merged checkpoint, checking each file's SHA-256.

Generate the stubs once (Debian: apt-get install python3-grpcio python3-grpc-tools), from the repository root:

    python3 -m grpc_tools.protoc -I proto --python_out=docs/examples/python/gen \
        --grpc_python_out=docs/examples/python/gen proto/dppa/v1/*.proto

then, with a .dppa file made by `npx dppa prune ... --out math.dppa`:

    DPPA_ADMIN_TOKEN=... PYTHONPATH=docs/examples/python/gen python3 docs/examples/python/party.py \
        --server 127.0.0.1:50051 --base-path SERVER_BASE_DIR --party math --delta math.dppa --out merged

Plaintext, as here, is for a server on loopback; use grpc.secure_channel with
grpc.ssl_channel_credentials(ca) for any other.
"""
import argparse
import hashlib
import os
import struct
import sys

import grpc
from dppa.v1 import download_pb2, download_pb2_grpc, jobs_pb2, jobs_pb2_grpc, sparse_pb2, upload_pb2, upload_pb2_grpc

MAGIC = b"DPPA\x00\x01\r\n"
MAX_RECORD = 16 * 1024 * 1024


def read_records(path):
    """Yields the DeltaRecords of a .dppa file: magic, then u32-LE-length-framed records, then a zero length."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path}: not a .dppa file of container version 1")
        while True:
            raw = f.read(4)
            if len(raw) != 4:
                raise ValueError(f"{path}: truncated")
            (length,) = struct.unpack("<I", raw)
            if length == 0:
                return
            if length > MAX_RECORD:
                raise ValueError(f"{path}: record of {length} bytes")
            body = f.read(length)
            if len(body) != length:
                raise ValueError(f"{path}: truncated")
            yield sparse_pb2.DeltaRecord.FromString(body)


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", required=True, help="HOST:PORT of the aggregation server")
    p.add_argument("--base-path", required=True, help="the base checkpoint's folder on the server's disk")
    p.add_argument("--party", required=True, help="party name")
    p.add_argument("--delta", required=True, help=".dppa file made by `dppa prune`")
    p.add_argument("--out", required=True, help="folder to download the merged checkpoint into")
    args = p.parse_args()
    admin_token = os.environ.get("DPPA_ADMIN_TOKEN")
    if not admin_token:
        sys.exit("DPPA_ADMIN_TOKEN is not set")

    records = read_records(args.delta)
    header = next(records).header
    records.close()
    with grpc.insecure_channel(args.server) as channel:
        jobs = jobs_pb2_grpc.JobServiceStub(channel)

        # 1. Admin: a job for this one party, at the file's rate and method, DPA off (factors 1).
        created = jobs.CreateJob(
            jobs_pb2.CreateJobRequest(
                base_path=args.base_path,
                parties=[args.party],
                rate=header.rate,
                method=header.method,
                dpa=jobs_pb2.DpaConfig(off=True),
                label="python party example",
            ),
            metadata=bearer(admin_token),
            timeout=30,
        )
        job_id = created.job.id
        print(f"job {job_id} created")

        # 2. Party: the upload stream is an UploadOpen, then the file's records as they are.
        def requests():
            yield upload_pb2.UploadRequest(open=upload_pb2.UploadOpen(job_id=job_id, party=args.party))
            for record in read_records(args.delta):
                yield upload_pb2.UploadRequest(record=record)

        state = upload_pb2_grpc.UploadServiceStub(channel).Upload(requests(), metadata=bearer(created.tokens[args.party]))
        print(f"{args.party}: the server holds {len(state.tensors_received)}/{state.tensors_expected} tensors, complete={state.complete}")

        # 3. Watch the job until the server ends the stream (merged or failed).
        for event in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=bearer(admin_token)):
            kind = event.WhichOneof("event")
            if kind == "state_changed":
                print(f"state -> {jobs_pb2.JobState.Name(event.state_changed.to)}")
            elif kind == "failed":
                sys.exit(f"job failed: {event.failed.reason}")

        # 4. Download every file of the merged checkpoint and check its SHA-256.
        downloads = download_pb2_grpc.DownloadServiceStub(channel)
        files = downloads.ListFiles(download_pb2.ListFilesRequest(job_id=job_id), metadata=bearer(admin_token), timeout=30).files
        for f in files:
            target = os.path.join(args.out, f.path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                for chunk in downloads.Download(download_pb2.DownloadRequest(job_id=job_id, path=f.path), metadata=bearer(admin_token)):
                    out.write(chunk.data)
                    digest.update(chunk.data)
            if digest.hexdigest() != f.sha256:
                sys.exit(f"{f.path}: SHA-256 differs from the server's")
        print(f"merged checkpoint in {args.out}: {', '.join(f.path for f in files)}")


if __name__ == "__main__":
    main()
