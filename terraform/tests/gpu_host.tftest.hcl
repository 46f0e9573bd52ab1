# The gpu_host module on its own: IMDSv2, encryption, placement, addresses, permissions.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name               = "llm"
  ssh_public_key     = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJq7eXAMPLEkEyFoRtEsTsOnLy test@example"
  security_group_ids = ["sg-0123456789abcdef0"]
  subnets = [
    { id = "subnet-0aaaaaaaaaaaaaaaa", availability_zone = "us-east-1a" },
    { id = "subnet-0bbbbbbbbbbbbbbbb", availability_zone = "us-east-1b" },
  ]
}

run "imdsv2_and_encryption_everywhere" {
  module {
    source = "./modules/gpu_host"
  }

  variables {
    host_count = 2
  }

  assert {
    condition = alltrue([
      for h in aws_instance.this : h.metadata_options[0].http_tokens == "required" && h.metadata_options[0].http_put_response_hop_limit == 1
    ])
    error_message = "every host must require IMDSv2 tokens"
  }
  assert {
    condition     = alltrue([for h in aws_instance.this : h.root_block_device[0].encrypted && h.root_block_device[0].volume_type == "gp3"])
    error_message = "every root volume must be encrypted gp3"
  }
  assert {
    condition     = alltrue([for v in aws_ebs_volume.models : v.encrypted && v.type == "gp3" && v.size == 100])
    error_message = "every models volume must be encrypted gp3 of models_volume_size_gb"
  }
  assert {
    condition     = alltrue([for h in aws_instance.this : h.monitoring && h.ebs_optimized])
    error_message = "detailed monitoring and EBS optimisation on every host"
  }
}

run "detailed_monitoring_is_a_setting" {
  module {
    source = "./modules/gpu_host"
  }

  variables {
    detailed_monitoring = false
  }

  assert {
    condition     = alltrue([for h in aws_instance.this : !h.monitoring && h.ebs_optimized])
    error_message = "detailed_monitoring = false must turn off one-minute metrics, nothing else"
  }
}

run "hosts_spread_over_both_zones_with_their_own_volume_and_address" {
  module {
    source = "./modules/gpu_host"
  }

  variables {
    host_count            = 3
    models_volume_size_gb = 250
  }

  assert {
    condition     = aws_instance.this[*].subnet_id == ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb", "subnet-0aaaaaaaaaaaaaaaa"]
    error_message = "hosts must go round-robin over the subnets"
  }
  assert {
    condition     = aws_ebs_volume.models[*].availability_zone == ["us-east-1a", "us-east-1b", "us-east-1a"]
    error_message = "each models volume must sit in its host's zone"
  }
  assert {
    condition     = aws_volume_attachment.models[*].instance_id == aws_instance.this[*].id && alltrue(aws_volume_attachment.models[*].stop_instance_before_detaching)
    error_message = "each models volume must attach to its own host and detach only from a stopped one"
  }
  assert {
    condition     = aws_eip.this[*].instance == aws_instance.this[*].id
    error_message = "each host must keep its address in its own Elastic IP"
  }
  assert {
    condition     = [for h in output.hosts : h.name] == ["llm-gpu-0", "llm-gpu-1", "llm-gpu-2"] && alltrue([for h in aws_instance.this : h.tags["Role"] == "gpu-host" && h.tags["SshUser"] == "ubuntu"])
    error_message = "hosts are named <name>-gpu-<index> and tagged for the operations tools"
  }
  assert {
    condition     = alltrue([for v in aws_ebs_volume.models : v.size == 250])
    error_message = "models_volume_size_gb must size the models volumes"
  }
}

run "no_bucket_access_unless_asked" {
  module {
    source = "./modules/gpu_host"
  }

  assert {
    condition     = length(aws_iam_role_policy.model_bucket_cache) == 0 && output.model_cache_url == null
    error_message = "without a bucket the role has no S3 access and the hosts no cache"
  }
  assert {
    condition     = endswith(aws_iam_role_policy_attachment.ssm.policy_arn, ":iam::aws:policy/AmazonSSMManagedInstanceCore")
    error_message = "hosts must be reachable through SSM as a fallback to SSH"
  }
}

run "bucket_access_reads_the_bucket_and_writes_only_the_cache_prefix" {
  module {
    source = "./modules/gpu_host"
  }

  variables {
    enable_model_bucket_access = true
    model_bucket_arn           = "arn:aws:s3:::llm-models-abc"
  }

  assert {
    condition = toset(flatten([
      for s in jsondecode(aws_iam_role_policy.model_bucket_cache[0].policy).Statement : s.Action
    ])) == toset(["s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"])
    error_message = "the hosts may list and read the bucket and upload to it; no delete, no bucket settings"
  }
  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.model_bucket_cache[0].policy).Statement :
      s.Resource == "arn:aws:s3:::llm-models-abc/hf-cache/*"
      if contains(flatten([s.Action]), "s3:PutObject")
    ]) && anytrue([for s in jsondecode(aws_iam_role_policy.model_bucket_cache[0].policy).Statement : contains(flatten([s.Action]), "s3:PutObject")])
    error_message = "uploads must be limited to the cache prefix"
  }
  # the URL Ansible gets (models_s3_cache) is the very prefix the role may write
  assert {
    condition     = output.model_cache_url == "s3://llm-models-abc/hf-cache"
    error_message = "model_cache_url must name the bucket and the writable prefix"
  }
}

run "cache_prefix_must_be_a_clean_key_prefix" {
  command = plan

  module {
    source = "./modules/gpu_host"
  }

  variables {
    enable_model_bucket_access = true
    model_bucket_arn           = "arn:aws:s3:::llm-models-abc"
    model_bucket_write_prefix  = "/hf-cache/"
  }

  expect_failures = [var.model_bucket_write_prefix]
}

run "a_new_image_does_not_replace_an_existing_host" {
  command = plan

  module {
    source = "./modules/gpu_host"
  }

  variables {
    ami_id = "ami-0fedcba9876543210"
  }

  # the hosts of the runs above exist in this state: their image must stay put
  assert {
    condition     = aws_instance.this[0].ami == "ami-0123456789abcdef0"
    error_message = "a different image must not replace a configured host (lifecycle ignore_changes)"
  }
}

run "a_pinned_ami_skips_the_lookup" {
  command   = plan
  state_key = "fresh"

  module {
    source = "./modules/gpu_host"
  }

  variables {
    ami_id = "ami-0fedcba9876543210"
  }

  assert {
    condition     = length(data.aws_ssm_parameter.ami) == 0 && aws_instance.this[0].ami == "ami-0fedcba9876543210"
    error_message = "ami_id must be used as given, without looking up the newest image"
  }
}

run "ubuntu_comes_from_canonicals_ssm_parameter" {
  command   = plan
  state_key = "ssm"

  module {
    source = "./modules/gpu_host"
  }

  override_data {
    target = data.aws_ssm_parameter.ami
    values = { insecure_value = "ami-0c0ffee0c0ffee000", type = "String" }
  }

  assert {
    condition     = data.aws_ssm_parameter.ami[0].name == "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    error_message = "the default image is the one Canonical's SSM parameter names for 24.04 (gp3, amd64)"
  }
  assert {
    condition     = aws_instance.this[0].ami == "ami-0c0ffee0c0ffee000"
    error_message = "the host must boot the image the parameter holds"
  }
}

# AWS's public parameter for the Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04),
# x86_64: no name search over images, which another account's look-alike could match
run "deep_learning_ami_comes_from_aws_ssm_parameter" {
  command   = plan
  state_key = "dlami"

  module {
    source = "./modules/gpu_host"
  }

  variables {
    ami_flavor = "dlami-ubuntu-24.04"
  }

  override_data {
    target = data.aws_ssm_parameter.ami
    values = { insecure_value = "ami-0d1a0d1a0d1a0d1a0", type = "String" }
  }

  assert {
    condition     = data.aws_ssm_parameter.ami[0].name == "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
    error_message = "the Deep Learning AMI is the one AWS's public SSM parameter names (base OSS Nvidia driver GPU, Ubuntu 24.04, x86_64)"
  }
  assert {
    condition     = aws_instance.this[0].ami == "ami-0d1a0d1a0d1a0d1a0" && output.ami_id == "ami-0d1a0d1a0d1a0d1a0"
    error_message = "the host must boot the Deep Learning AMI the parameter holds"
  }
}

run "no_route53_permissions_without_lets_encrypt" {
  command   = plan
  state_key = "letsencrypt-off"

  module {
    source = "./modules/gpu_host"
  }

  assert {
    condition     = length(aws_iam_role_policy.letsencrypt_dns) == 0 && output.letsencrypt_dns_policy == null
    error_message = "without letsencrypt_domain the host role must have no Route53 permission at all"
  }
}

run "lets_encrypt_may_write_only_the_challenge_record_of_its_zone" {
  command   = plan
  state_key = "letsencrypt-on"

  module {
    source = "./modules/gpu_host"
  }

  variables {
    letsencrypt_domain  = "api.example.com"
    letsencrypt_zone_id = "Z0123456789ABCDEFGHIJ"
  }

  # exactly what certbot's Route53 plugin calls: ListHostedZones (find the zone),
  # ChangeResourceRecordSets (UPSERT, then DELETE, the TXT record), GetChange (wait for INSYNC)
  assert {
    condition = toset(flatten([
      for s in jsondecode(aws_iam_role_policy.letsencrypt_dns[0].policy).Statement : s.Action
    ])) == toset(["route53:ListHostedZones", "route53:GetChange", "route53:ChangeResourceRecordSets"])
    error_message = "the role may list zones, read changes and change record sets: nothing else in Route53"
  }
  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.letsencrypt_dns[0].policy).Statement : s.Effect == "Allow" && (
        s.Action == "route53:ChangeResourceRecordSets" ? s.Resource == "arn:aws:route53:::hostedzone/Z0123456789ABCDEFGHIJ" :
        s.Action == "route53:GetChange" ? s.Resource == "arn:aws:route53:::change/*" :
        s.Action == "route53:ListHostedZones"
      )
    ])
    error_message = "record changes must be limited to the deployment's hosted zone, change reads to change IDs"
  }
  assert {
    condition = one([
      for s in jsondecode(aws_iam_role_policy.letsencrypt_dns[0].policy).Statement : s.Condition["ForAllValues:StringEquals"]
      if s.Action == "route53:ChangeResourceRecordSets"
      ]) == {
      "route53:ChangeResourceRecordSetsNormalizedRecordNames" = ["_acme-challenge.api.example.com"]
      "route53:ChangeResourceRecordSetsRecordTypes"           = ["TXT"]
      "route53:ChangeResourceRecordSetsActions"               = ["UPSERT", "DELETE"]
    }
    error_message = "in the zone, only the TXT record _acme-challenge.<domain> may be upserted or deleted (not the API's A record)"
  }
  assert {
    condition     = output.letsencrypt_dns_policy == aws_iam_role_policy.letsencrypt_dns[0].policy
    error_message = "the module must show the policy it gave the role"
  }
}

run "a_lets_encrypt_domain_needs_its_zone" {
  command   = plan
  state_key = "letsencrypt-bad"

  module {
    source = "./modules/gpu_host"
  }

  variables {
    letsencrypt_domain = "api.example.com"
  }

  expect_failures = [var.letsencrypt_zone_id]
}
