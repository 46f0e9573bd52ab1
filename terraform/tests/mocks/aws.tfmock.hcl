# Shared mock values for `mock_provider "aws" { source = "./tests/mocks" }`. The provider still
# validates what it is given (ARNs, partitions), so the values it checks are well-formed here;
# everything else is invented by Terraform.

mock_data "aws_ec2_instance_type_offerings" {
  # deliberately unsorted, with a third zone: the root must pick the first two in order
  defaults = { locations = ["us-east-1c", "us-east-1a", "us-east-1b"] }
}

mock_data "aws_availability_zones" {
  # the region's regular zones (a Local Zone never matches the filters)
  defaults = { names = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"] }
}

mock_data "aws_ssm_parameter" {
  # Canonical's (Ubuntu) and AWS's (Deep Learning AMI) public parameters hold the current image ID
  defaults = { insecure_value = "ami-0123456789abcdef0", type = "String" }
}

mock_data "aws_partition" {
  defaults = { partition = "aws", dns_suffix = "amazonaws.com" }
}

mock_resource "aws_lb" {
  defaults = { arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/llm-api/0123456789abcdef" }
}

mock_resource "aws_lb_target_group" {
  defaults = { arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/llm-gw/0123456789abcdef" }
}

mock_resource "aws_acm_certificate_validation" {
  defaults = { certificate_arn = "arn:aws:acm:us-east-1:123456789012:certificate/0b1c2d3e-aaaa-bbbb-cccc-000000000001" }
}

mock_resource "aws_acm_certificate" {
  defaults = {
    arn = "arn:aws:acm:us-east-1:123456789012:certificate/0b1c2d3e-aaaa-bbbb-cccc-000000000001"
    # the real provider fills this in from ACM; a mock would leave the set empty
    domain_validation_options = [{
      domain_name           = "api.example.com"
      resource_record_name  = "_x1.api.example.com."
      resource_record_type  = "CNAME"
      resource_record_value = "_x2.acm-validations.aws."
    }]
  }
}

mock_resource "aws_s3_bucket" {
  # name and ARN agree, as in AWS (the hosts' cache URL is built from the ARN)
  defaults = {
    id     = "llm-models-20250101000000000000000001"
    bucket = "llm-models-20250101000000000000000001"
    arn    = "arn:aws:s3:::llm-models-20250101000000000000000001"
  }
}

mock_resource "aws_kms_key" {
  # the key store's first object names its key by ARN, which the provider checks
  defaults = { arn = "arn:aws:kms:us-east-1:123456789012:key/0b1c2d3e-aaaa-bbbb-cccc-000000000001" }
}

mock_resource "aws_cloudwatch_log_group" {
  defaults = { arn = "arn:aws:logs:us-east-1:123456789012:log-group:/vpc/llm/flow-logs" }
}

mock_resource "aws_iam_role" {
  defaults = { arn = "arn:aws:iam::123456789012:role/llm-test-role" }
}

mock_data "aws_caller_identity" {
  defaults = { account_id = "123456789012" }
}

mock_resource "aws_ssm_parameter" {
  # the hosts' policy names the parameter by its ARN, as AWS reports it
  defaults = { arn = "arn:aws:ssm:us-east-1:123456789012:parameter/llm/gateway/redis-auth-token" }
}
