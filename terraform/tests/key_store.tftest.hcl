# The key store on its own and in the root: one encrypted, versioned object holding the
# gateways' hashed keys, that the hosts' role may read and nothing more.

mock_provider "aws" {
  source = "./tests/mocks"
}

# what the mock would invent at random, the policies need well-formed
override_resource {
  target = module.key_store[0].aws_s3_bucket.this
  values = { id = "llm-keys-20250101000000000000000001", arn = "arn:aws:s3:::llm-keys-20250101000000000000000001" }
}

override_resource {
  target = module.key_store[0].aws_kms_key.this
  values = { arn = "arn:aws:kms:us-east-1:123456789012:key/0b1c2d3e-aaaa-bbbb-cccc-000000000001", key_id = "0b1c2d3e-aaaa-bbbb-cccc-000000000001" }
}

override_data {
  target = module.key_store[0].data.aws_caller_identity.current
  values = { account_id = "123456789012" }
}

override_data {
  target = module.key_store[0].data.aws_ec2_managed_prefix_list.s3
  values = { entries = [{ cidr = "54.231.0.0/16", description = "" }, { cidr = "3.5.0.0/19", description = "" }] }
}

variables {
  admin_cidrs    = ["203.0.113.7/32"]
  ssh_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy test@example"
}

run "module_bucket_is_private_versioned_tls_only_and_encrypted_with_its_own_key" {
  module {
    source = "./modules/key_store"
  }

  variables {
    name           = "llm"
    region         = "us-east-1"
    host_role_name = "llm-gpu-host-role"
  }

  override_resource {
    target = aws_s3_bucket.this
    values = { id = "llm-keys-20250101000000000000000001", arn = "arn:aws:s3:::llm-keys-20250101000000000000000001" }
  }

  override_resource {
    target = aws_kms_key.this
    values = { arn = "arn:aws:kms:us-east-1:123456789012:key/0b1c2d3e-aaaa-bbbb-cccc-000000000001", key_id = "0b1c2d3e-aaaa-bbbb-cccc-000000000001" }
  }

  override_data {
    target = data.aws_caller_identity.current
    values = { account_id = "123456789012" }
  }

  override_data {
    target = data.aws_ec2_managed_prefix_list.s3
    values = { entries = [{ cidr = "54.231.0.0/16", description = "" }, { cidr = "3.5.0.0/19", description = "" }] }
  }

  assert {
    condition = (
      aws_s3_bucket_public_access_block.this.block_public_acls && aws_s3_bucket_public_access_block.this.block_public_policy &&
      aws_s3_bucket_public_access_block.this.ignore_public_acls && aws_s3_bucket_public_access_block.this.restrict_public_buckets
    )
    error_message = "all four public access blocks must be on"
  }
  assert {
    condition     = one(aws_s3_bucket_ownership_controls.this.rule).object_ownership == "BucketOwnerEnforced"
    error_message = "ACLs must be disabled"
  }
  assert {
    condition     = aws_s3_bucket_versioning.this.versioning_configuration[0].status == "Enabled"
    error_message = "the bucket must be versioned: a bad change is undone by restoring a version"
  }
  assert {
    condition = anytrue([
      for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement :
      s.Effect == "Deny" && s.Principal == "*" && s.Action == "s3:*" && s.Condition.Bool["aws:SecureTransport"] == "false"
    ])
    error_message = "requests without TLS must be denied"
  }
  assert {
    condition = (
      one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms" &&
      one(one(aws_s3_bucket_server_side_encryption_configuration.this.rule).apply_server_side_encryption_by_default).kms_master_key_id == aws_kms_key.this.arn &&
      !one(aws_s3_bucket_server_side_encryption_configuration.this.rule).bucket_key_enabled
    )
    error_message = "objects must be encrypted with the store's own KMS key, without a bucket key (the object's ARN is the encryption context the hosts' grant names)"
  }
  assert {
    condition     = aws_kms_key.this.enable_key_rotation && aws_kms_alias.this.name == "alias/llm-keys"
    error_message = "the key rotates yearly and has a readable alias"
  }
  assert {
    condition = jsondecode(aws_kms_key.this.policy).Statement == [{
      Sid = "AccountAdministersThroughIam", Effect = "Allow", Principal = { AWS = "arn:aws:iam::123456789012:root" }, Action = "kms:*", Resource = "*"
    }]
    error_message = "the key policy defers to the account's IAM (no principal outside the account, no grant to the hosts in it)"
  }
  assert {
    condition = (
      aws_s3_object.keys.key == "keys.json" && jsondecode(aws_s3_object.keys.content) == { version = 1, keys = [] } &&
      aws_s3_object.keys.server_side_encryption == "aws:kms" && aws_s3_object.keys.kms_key_id == aws_kms_key.this.arn
    )
    error_message = "the first version is an empty key set (version 1), encrypted with the store's key"
  }
  assert {
    condition     = one(aws_s3_bucket_lifecycle_configuration.this.rule).noncurrent_version_expiration[0].noncurrent_days == 90
    error_message = "old versions are kept 90 days by default"
  }
  assert {
    condition     = output.url == "s3://llm-keys-20250101000000000000000001/keys.json" && output.object_arn == "arn:aws:s3:::llm-keys-20250101000000000000000001/keys.json"
    error_message = "the url output names the object the gateways read"
  }
  assert {
    condition     = output.s3_cidrs == tolist(["3.5.0.0/19", "54.231.0.0/16"]) && data.aws_ec2_managed_prefix_list.s3.name == "com.amazonaws.us-east-1.s3"
    error_message = "the gateway unit is allowed S3's ranges in the region (its managed prefix list), sorted"
  }
}

run "module_hosts_read_exactly_the_object_and_decrypt_it_only_through_s3" {
  module {
    source = "./modules/key_store"
  }

  variables {
    name           = "llm"
    region         = "eu-west-1"
    host_role_name = "llm-gpu-host-role"
    object_key     = "gateway/keys.json"
  }

  override_resource {
    target = aws_s3_bucket.this
    values = { id = "llm-keys-20250101000000000000000001", arn = "arn:aws:s3:::llm-keys-20250101000000000000000001" }
  }

  assert {
    condition     = aws_iam_role_policy.read.role == "llm-gpu-host-role"
    error_message = "the read policy belongs to the hosts' role"
  }
  assert {
    condition = jsondecode(aws_iam_role_policy.read.policy).Statement == [
      { Sid = "ReadKeySet", Effect = "Allow", Action = "s3:GetObject", Resource = "arn:aws:s3:::llm-keys-20250101000000000000000001/gateway/keys.json" },
      {
        Sid      = "DecryptKeySetThroughS3", Effect = "Allow", Action = "kms:Decrypt",
        Resource = aws_kms_key.this.arn,
        Condition = { StringEquals = {
          "kms:ViaService"                   = "s3.eu-west-1.amazonaws.com"
          "kms:EncryptionContext:aws:s3:arn" = "arn:aws:s3:::llm-keys-20250101000000000000000001/gateway/keys.json"
        } }
      },
    ]
    error_message = "the hosts may GetObject the keys object only (no write, list, delete or other object) and decrypt with the store's key only through S3 of the region, for that object"
  }
  assert {
    condition     = output.url == "s3://llm-keys-20250101000000000000000001/gateway/keys.json"
    error_message = "object_key names the object"
  }
}

run "module_refuses_an_object_key_that_is_a_folder" {
  command = plan

  module {
    source = "./modules/key_store"
  }

  variables {
    name           = "llm"
    region         = "us-east-1"
    host_role_name = "llm-gpu-host-role"
    object_key     = "keys/"
  }

  expect_failures = [var.object_key]
}

run "root_one_host_keeps_its_keys_file_unless_asked" {
  command = plan

  assert {
    condition     = length(module.key_store) == 0 && output.key_store_url == null && length(output.key_store_s3_cidrs) == 0
    error_message = "a single host without create_key_store keeps the keys file on its disk: no bucket, no KMS key"
  }
}

run "root_one_host_with_the_key_store" {
  variables {
    create_key_store = true
  }

  assert {
    condition     = length(module.key_store) == 1 && output.key_store_url == "s3://llm-keys-20250101000000000000000001/keys.json"
    error_message = "create_key_store must create the store and output its URL for the inventory"
  }
  assert {
    condition     = module.key_store[0].host_read_policy != null && output.key_store_s3_cidrs == tolist(["3.5.0.0/19", "54.231.0.0/16"])
    error_message = "the hosts' role must get the read policy, and the inventory S3's ranges"
  }
}

run "root_several_hosts_always_share_one_key_set" {
  variables {
    host_count      = 2
    domain_name     = "api.example.com"
    route53_zone_id = "Z0123456789ABCDEFGHIJ"
  }

  assert {
    condition     = length(module.key_store) == 1 && output.key_store_url != null
    error_message = "more than one host must share one key set: every host serves the same keys"
  }
}
